"""RadDiagSeg-M model library: components, presets, generation and checkpoints (INTERFACES "Model").

Heavy imports happen on first attribute access so that `import raddiagseg.model` stays cheap.
"""

__all__ = [
    "RadDiagSegModel", "RadDiagSegConfig", "preset_config", "ImageFeatures", "GenerationResult", "SegmentResult",
    "build_model", "load_model",
]

_LAZY = {
    "RadDiagSegModel": "raddiagseg.model.raddiagseg",
    "RadDiagSegConfig": "raddiagseg.model.config",
    "preset_config": "raddiagseg.model.config",
    "ImageFeatures": "raddiagseg.model.outputs",
    "GenerationResult": "raddiagseg.model.outputs",
    "SegmentResult": "raddiagseg.model.outputs",
    "build_model": "raddiagseg",
    "load_model": "raddiagseg",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raddiagseg.model' has no attribute {name!r}")
