"""RadDiagSeg-M: answer a radiology question and segment every target the answer names.

Heavy imports (torch, transformers) happen lazily so that `raddiagseg --help` and the
pure-Python parts (templates, scoring) stay fast to import.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "build_model", "__version__"]


def load_model(path, device=None, dtype=None):
    """Load a checkpoint folder (config JSON + safetensors + tokenizer) written by `save_pretrained`."""
    from raddiagseg.model.raddiagseg import RadDiagSegModel

    return RadDiagSegModel.from_pretrained(path, device=device, dtype=dtype)


def build_model(preset="demo", **overrides):
    """Build a freshly initialised model from a named preset (`demo` or `paper`)."""
    from raddiagseg.model.raddiagseg import RadDiagSegModel
    from raddiagseg.model.config import preset_config

    return RadDiagSegModel(preset_config(preset, **overrides))
