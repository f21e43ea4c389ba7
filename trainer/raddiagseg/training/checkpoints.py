"""Checkpoints: a model folder (the model's `save_pretrained`) written atomically, plus the training state to resume.

Writing goes to a hidden temporary folder next to the target, which then replaces the target
with renames, so a crash at any moment leaves either the previous or the new checkpoint, never a
half-written one (and `resolve_checkpoint` finds the previous one if the crash hit between renames).
"""

import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from raddiagseg.fileio import previous_folder, replace_folder

STATE_FILE = "training_state.pt"
INFO_FILE = "checkpoint.json"


def rng_state():
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(model, target, training_state=None, info=None, dtype=None):
    """Save `model` (and optionally the resumable training state, a small JSON info) as folder `target`, atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model(model, tmp, dtype)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_model(model, folder, dtype=None):
    """`model.save_pretrained(folder)`, cast to `dtype` when given (e.g. float16 for a small shipped model)."""
    if dtype is None or dtype == torch.float32:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, dtype=dtype)


def resolve_checkpoint(target):
    """The usable folder for `target`: itself, or the `.old` copy a crash between the two renames left."""
    target = Path(target)
    if (target / "config.json").is_file():
        return target
    old = previous_folder(target)
    if (old / "config.json").is_file():
        return old
    return None


def read_training_state(folder):
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    # our own file: it holds python/numpy RNG states and plain containers, not only tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def read_info(folder):
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
