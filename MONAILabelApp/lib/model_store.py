"""Which model folder is served, loading it lazily, and publishing retrained models atomically.

Layout under the app's work dir:

    models/v0001-20261123T031500/   published checkpoints (config.json + safetensors + tokenizer)
    models/CURRENT                  name of the served one (replaced atomically)

Without a published model the base model (`--conf model_path`, default the shipped demo) is
served. Every request checks `CURRENT` and the served folder's file times, so a model the train
task (a separate process) publishes, or a model folder replaced on disk, is picked up without a
restart. Older versions are kept (the last `keep` plus the served one) so a bad model can be
rolled back by editing `CURRENT`.
"""

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from raddiagseg.fileio import atomic_write

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("config.json", "model.safetensors")


DTYPES = ("auto", "float32", "bfloat16", "mixed")


def serving_precision(preset, device=None, choice="auto"):
    """(model dtype, image-encoder dtype) to serve a model of `preset` on `device` with `choice`:

    float32 / bfloat16: the whole model; mixed: the image encoders (vision backbone, CLIP encoder,
    projector) in bf16, the LM and mask decoder in fp32; auto: bf16 on a GPU that supports it, on CPU
    bf16 for the paper preset (billions of weights, matmul-bound: bf16 halves the memory and this
    CPU's bf16 matmuls are ~4x faster) and mixed for the demo preset when the CPU has native bf16 (its
    encoders are ~2x faster in bf16, its small dispatch-bound decode steps are not; answers unchanged on
    phantoms, masks Dice ~0.997 vs fp32: benchmarks/dtype.py, RESULTS.md), else fp32.
    """
    import torch

    if choice == "mixed":
        return torch.float32, torch.bfloat16
    if choice != "auto":
        return getattr(torch, choice), getattr(torch, choice)
    if str(device or "cpu").startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return dtype, dtype
    if preset == "demo":
        return serving_precision(preset, device, "mixed" if cpu_has_fast_bf16() else "float32")
    return torch.bfloat16, torch.bfloat16


def cpu_has_fast_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); without it bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def load_for_serving(folder, device=None, choice="auto", quantize=None, compile_decode=False):
    """Load a model folder in the precision `serving_precision` picks (built directly in that dtype); `quantize`
    (None, "int8", "int8-all") makes its Linear weights int8 (`raddiagseg.model.quantize`); `compile_decode`
    compiles its decode step (`raddiagseg.model.static_decode`)."""
    from raddiagseg import load_model

    dtype, encoder_dtype = serving_precision(folder_preset(folder), device, choice)
    model = load_model(str(folder), device=device, dtype=dtype)
    if encoder_dtype != dtype:
        model.set_encoder_dtype(encoder_dtype)
    if quantize:
        from raddiagseg.model.quantize import quantize_model

        quantize_model(model, quantize)
    model.language_model.compile_decode = bool(compile_decode)
    return model.eval()


def folder_preset(folder):
    """The preset name a checkpoint folder's config.json records (None when unreadable)."""
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("preset")
    except (OSError, ValueError):
        return None


def is_model_dir(path):
    return path is not None and (Path(path) / "config.json").is_file()


class ModelStore:
    def __init__(self, base_model_dir, work_dir, device=None, keep=3, dtype="auto", quantize=None, compile_decode=False):
        self.base_model_dir = Path(base_model_dir) if base_model_dir else None
        self.models_dir = Path(work_dir) / "models"
        self.device = device
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        if quantize not in (None, "int8", "int8-all"):
            raise ValueError(f"quantize must be int8 or int8-all, got {quantize!r}")
        self.quantize = quantize
        self.compile_decode = compile_decode
        self.keep = keep
        self._lock = threading.Lock()
        self._model = None
        self._version = None
        self.loads = 0
        self.on_change = []  # callbacks(version) run after a new model is loaded

    # which folder -------------------------------------------------------------------------
    def current_dir(self):
        """The folder that should be served now."""
        pointer = self.models_dir / "CURRENT"
        try:
            name = pointer.read_text().strip()
        except OSError:
            name = ""
        if name and is_model_dir(self.models_dir / name):
            return self.models_dir / name
        return self.base_model_dir

    def version(self, folder=None):
        """A string that changes whenever the served folder or its weights change."""
        folder = Path(folder or self.current_dir())
        stamps = []
        for name in WEIGHT_FILES:
            try:
                stamps.append(str((folder / name).stat().st_mtime_ns))
            except OSError:
                stamps.append("-")
        return f"{folder.name}@{'.'.join(stamps)}"

    def available(self):
        return is_model_dir(self.current_dir())

    # loading ------------------------------------------------------------------------------
    def get(self):
        """(model, version), loading or reloading the served folder when it changed."""
        folder = self.current_dir()
        if not is_model_dir(folder):
            raise FileNotFoundError(
                f"no model folder at {folder}: pass --conf model_path DIR (a folder written by save_pretrained)"
            )
        version = self.version(folder)
        with self._lock:
            if self._model is None or version != self._version:
                logger.info("Loading model %s (version %s)", folder, version)
                model = load_for_serving(folder, self.device, self.dtype, self.quantize, self.compile_decode)
                self._model, self._version = model, version
                self.loads += 1
                for callback in self.on_change:
                    callback(version)
            return self._model, self._version

    # publishing ---------------------------------------------------------------------------
    def publish(self, checkpoint_dir):
        """Copy a checkpoint into models/ and make it the served one; return its folder."""
        if not is_model_dir(checkpoint_dir):
            raise FileNotFoundError(f"{checkpoint_dir} is not a model folder (no config.json)")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        existing = sorted(p.name for p in self.models_dir.glob("v[0-9]*") if p.is_dir())
        number = int(existing[-1][1:5]) + 1 if existing else 1
        name = f"v{number:04d}-{time.strftime('%Y%m%dT%H%M%S')}"
        staging = self.models_dir / f".tmp-{uuid.uuid4().hex}"
        shutil.copytree(checkpoint_dir, staging)
        os.replace(staging, self.models_dir / name)  # the folder appears complete or not at all
        atomic_write(self.models_dir / "CURRENT", name + "\n", prefix=".CURRENT-")
        self._prune(keep_name=name)
        logger.info("Published model %s", name)
        return self.models_dir / name

    def _remove_stale(self):
        """Staging copies and pointer files left by a publish that was killed half-way (never served)."""
        for stale in [*self.models_dir.glob(".tmp-*"), *self.models_dir.glob(".CURRENT-*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def _prune(self, keep_name):
        versions = sorted(p for p in self.models_dir.glob("v[0-9]*") if p.is_dir())
        for old in versions[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


# the publishing gate -------------------------------------------------------------------------
# A metric of a modality regresses when its drop could exceed GATE_TOLERANCE: the one-sided GATE_CONFIDENCE upper bound
# of (served - candidate), paired bootstrap over the rows both models scored (`selection.drop_bounds`), not the observed
# drop alone. A model that answers the guard sets as the served one did has a bound of 0; one diagnosis flip among 60
# questions (observed -0.008) has a bound of ~0.026 and is refused (tests/test_app_retrain_gate.py); a model that forgot
# drops by 0.1-0.2 (issue 26). Measured: benchmarks/RESULTS.md, "Retraining that cannot publish a worse model".
GATE_TOLERANCE = 0.02
GATE_CONFIDENCE = 0.95
TOLERANCE_RULE = (f"no metric of any modality may drop by more than {GATE_TOLERANCE} at {GATE_CONFIDENCE:.0%} confidence "
                  "(upper bound of a paired bootstrap over the rows; Dice on the rows both models diagnose correctly) "
                  "on the reference set and the held-out corrections, and the corrected cases must score higher")
GUARD_SETS = ("reference", "heldout_corrections")  # sets the served model's quality is checked on
SET_TITLES = {"reference": "the reference validation set", "heldout_corrections": "the held-out corrections",
              "corrections": "the corrections it trained on"}


def _worse_text(items):
    titles = {"ct": "CT", "xray": "X-ray"}
    return ", ".join(f"{titles.get(w['modality'], w['modality'])} {w['metric']} {w['served']:.3f} -> {w['candidate']:.3f}"
                     + (f" (on the {w['rows']} rows compared: drop {w['drop']:.3f}, up to {w['upper_drop']:.3f})"
                        if w.get("rows") is not None else f" (drop up to {w['upper_drop']:.3f})" if "upper_drop" in w
                        else "") for w in items)


def gate(sets):
    """(publish, reason) for a retrained candidate, from `sets` = {name: comparison} where a comparison has `worse`
    (regressions beyond their tolerance, see `selection.regressions`) and each model's summary with its `score`
    (`{"served": {"score": ...}, "candidate": {"score": ...}}`).

    Publish only when the candidate is not worse on any guard set (the reference validation set of the model's
    training distribution, the held-out corrections: no metric's drop, or its upper bound, beyond GATE_TOLERANCE)
    and scores higher than the served model on the corrected cases (held-out ones when there are, else the training
    rows: that it learnt them). The training rows alone never publish.
    """
    guards = [name for name in GUARD_SETS if name in sets]
    if not guards:
        return False, ("nothing to check the candidate on but the corrections it trained on: give the model a "
                       "reference set (--conf reference_manifest) or correct at least 5 images so some are held out")
    for name in guards:
        if sets[name]["worse"]:
            return False, (f"could be worse than the served model on {SET_TITLES[name]} by more than {GATE_TOLERANCE}: "
                           f"{_worse_text(sets[name]['worse'])}; kept the served model")
    corrected = "heldout_corrections" if "heldout_corrections" in sets else "corrections"
    if corrected in sets:
        old, new = sets[corrected]["served"]["score"], sets[corrected]["candidate"]["score"]
        if old is not None and (new is None or new <= old):
            return False, (f"not better on {SET_TITLES[corrected]} ({new if new is None else round(new, 4)} vs the "
                           f"served model's {round(old, 4)}); kept the served model")
    checked = " and ".join(SET_TITLES[name] for name in guards)
    return True, (f"no metric of any modality may have dropped by more than {GATE_TOLERANCE} ({GATE_CONFIDENCE:.0%} "
                  f"upper bound) on {checked}; better on {SET_TITLES[corrected]}")
