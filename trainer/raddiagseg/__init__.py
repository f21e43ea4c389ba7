"""RadDiagSeg-M: answer a radiology question and segment every target the answer names.

Heavy imports (torch, transformers) happen lazily so that `raddiagseg --help` and the
pure-Python parts (templates, scoring) stay fast to import.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["load_model", "build_model", "__version__"]

if TYPE_CHECKING:
    import torch

    from raddiagseg.model.raddiagseg import RadDiagSegModel


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, frozen_dtype: torch.dtype | None = None) -> RadDiagSegModel:
    """Load a checkpoint folder (config JSON + safetensors + tokenizer) written by `save_pretrained`
    (`frozen_dtype`: see `RadDiagSegModel.from_pretrained`)."""
    from raddiagseg.model.raddiagseg import RadDiagSegModel

    return RadDiagSegModel.from_pretrained(path, device=device, dtype=dtype, frozen_dtype=frozen_dtype)


def build_model(preset: str = "demo", **overrides) -> RadDiagSegModel:
    """Build a freshly initialised model from a named preset (`demo` or `paper`); see `raddiagseg.model.builder`."""
    from raddiagseg.model.builder import build_model as build

    return build(preset, **overrides)
