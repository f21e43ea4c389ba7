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

    def fill(tmp):
        save_model(model, tmp, dtype)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))

    return write_folder(target, fill)


def write_folder(target, fill):
    """Folder `target` written by `fill(tmp)` into a hidden folder next to it, which then replaces it (atomically)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
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


def blend(base, tuned, weight, target):
    """Write model folder `target` with weights `base + weight x (tuned - base)` (weight-space interpolation between a
    model and its fine-tuned copy, WiSE-FT): weight 1 is `tuned`, 0 is `base`, in between a model that keeps more of
    what `base` knew. Both folders must hold the same tensors (a fine-tune of the same architecture); integer buffers
    and config, tokenizer and other files come from `tuned`. Read tensor by tensor (one model in memory, not two).

    For LoRA factors the product of blended factors is not the blend of the products, but the path still runs from
    `base` to `tuned`; whoever publishes the result checks it as it is (the app's gate)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from raddiagseg.model.raddiagseg import FORMAT_VERSION, WEIGHTS_FILE

    base, tuned, target = Path(base), Path(tuned), Path(target)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be between 0 and 1, got {weight}")
    state = {}
    with safe_open(str(base / WEIGHTS_FILE), "pt") as old, safe_open(str(tuned / WEIGHTS_FILE), "pt") as new:
        if set(old.keys()) != set(new.keys()):
            odd = sorted(set(old.keys()) ^ set(new.keys()))
            raise ValueError(f"{base} and {tuned} hold different tensors ({odd[:3]}...): not a fine-tune of one model")
        for key in new.keys():
            a, b = old.get_tensor(key), new.get_tensor(key)
            if a.shape != b.shape:
                raise ValueError(f"{key} has shape {tuple(a.shape)} in {base} and {tuple(b.shape)} in {tuned}")
            state[key] = a.float().lerp(b.float(), float(weight)).to(b.dtype) if b.is_floating_point() else b

    def fill(tmp):
        for path in tuned.iterdir():
            if path.is_file() and path.name not in (WEIGHTS_FILE, STATE_FILE):
                shutil.copyfile(path, tmp / path.name)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "raddiagseg": str(FORMAT_VERSION)})
        info = {**read_info(tuned), "blend": {"weight": float(weight), "base": str(base), "tuned": str(tuned)}}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))

    return write_folder(target, fill)
