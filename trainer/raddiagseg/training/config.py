"""What a training run is asked to do (`TrainConfig`) and the per-preset, per-stage defaults.

Pure Python (no torch) so the CLI can build and validate a config before the heavy imports.
The `paper` values are paper 001's appendix Table 7; the `demo` values are tuned for the tiny
demo model on synthetic phantoms on a 2-core CPU (see MONAILabelApp/model/raddiagseg-demo/MODEL_CARD.md).
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from raddiagseg.model.config import PRESETS as MODEL_PRESETS

STAGES = ("pretrain", "finetune")
PRESETS = tuple(MODEL_PRESETS)  # the model presets (raddiagseg.model.config.PRESETS); PRESET_DEFAULTS has each one
PRECISIONS = ("auto", "fp32", "bf16")
FROZEN_DTYPES = ("float32", "bfloat16")
ENGINES = ("ddp", "deepspeed")
WEIGHT_SOURCES = ("sam_checkpoint", "clip_dir", "lm_dir")  # model_overrides naming pretrained weight files

# Which manifest tasks each stage trains on, and in which proportion (paper 001, "Training details").
STAGE_TASKS = {
    "pretrain": {"refseg": 0.6, "vqa": 0.4},
    "finetune": {"vqaseg": 0.6, "vqa": 0.4},
}

# Hyper-parameters per (preset, stage). `epochs` sets max_steps when that is not given.
PRESET_DEFAULTS = {
    ("paper", "pretrain"): dict(lr=2e-4, batch_size=16, grad_accum=16, epochs=3, warmup=0.03, val_every=100),
    ("paper", "finetune"): dict(lr=2e-5, batch_size=16, grad_accum=4, epochs=5, warmup=0.03, val_every=100),
    ("demo", "pretrain"): dict(lr=1e-3, batch_size=8, grad_accum=1, epochs=None, max_steps=600, warmup=30, val_every=200),
    ("demo", "finetune"): dict(lr=5e-4, batch_size=8, grad_accum=1, epochs=None, max_steps=900, warmup=30, val_every=300),
}


@dataclass
class TrainConfig:
    """One training stage. `None` fields take the (preset, stage) default from PRESET_DEFAULTS.

    `batch_size` x `grad_accum` is the effective batch of one optimizer step, whatever the number of
    processes: under torchrun with K ranks the per-rank micro-batches are split so it stays the same.
    """

    data: str  # manifest.jsonl or the folder holding it
    out: str  # run folder: checkpoints, metrics.csv, tensorboard, loss_curves.png
    stage: str = "finetune"
    preset: str = "demo"
    init: Optional[str] = None  # checkpoint folder to start from (else a fresh `preset` model)
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None  # micro-batch per optimizer micro-step (1 process)
    grad_accum: Optional[int] = None
    lr: Optional[float] = None
    warmup: Optional[float] = None  # steps (>= 1) or a fraction of max_steps (< 1)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    ratio: Optional[dict] = None  # {task: weight}; default STAGE_TASKS[stage]
    val_every: Optional[int] = None
    val_samples: Optional[int] = 64  # evenly spread validation subset (None = whole split)
    val_split: str = "val"
    save_every: Optional[int] = None  # resumable "last" checkpoint; default = val_every
    seed: int = 0
    num_workers: int = 0
    precision: str = "auto"
    engine: str = "ddp"
    device: Optional[str] = None  # "cpu", "cuda", "cuda:1"; default: cuda when available
    resume: bool = False
    augment: bool = True
    augmentation: str = "basic"  # what `augment` applies: "basic" or "scanner" (data.dataset.AUGMENTATIONS)
    synonym_prob: float = 0.3
    save_dtype: str = "float32"  # dtype of the best/final model folder ("float16" halves its size)
    model_overrides: dict = field(default_factory=dict)  # build_model(preset, **overrides) for a fresh model
    frozen_dtype: str = "float32"  # dtype of the parameters that do not train ("bfloat16": half the memory of the LM base)
    gradient_checkpointing: bool = False  # recompute the LM's layer activations in backward (less memory, slower)
    rvls2m: Optional[dict] = None  # e.g. {"enabled": True, "grid": 8, "top_k": 8}: set on the model (fresh or --init) before training
    cot: bool = False  # diagnosis chain-of-thought answers for vqaseg samples (templates.vqaseg_cot_answer)
    trainable: dict = field(default_factory=dict)  # model.set_trainable(**trainable) after build/--init, e.g. {"clip": True}
    progress_bar: bool = True

    def manifest_path(self):
        path = Path(self.data)
        return path / "manifest.jsonl" if path.is_dir() else path

    def resolved(self):
        """A copy with every default filled in and the values checked (raises ValueError saying what to fix)."""
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "deepspeed" and self.resume:
            raise ValueError("--resume is not supported with --engine deepspeed (ZeRO keeps the optimizer state split "
                             "over the ranks): start a new run from the checkpoint with --init, or use --engine ddp")
        defaults = PRESET_DEFAULTS[(self.preset, self.stage)]
        values = dataclasses.asdict(self)
        for key in ("lr", "batch_size", "grad_accum", "warmup", "val_every", "epochs", "max_steps"):
            if values.get(key) is None and key in defaults and not (key == "max_steps" and values.get("epochs")):
                values[key] = defaults[key]
        if values["ratio"] is None:
            values["ratio"] = dict(STAGE_TASKS[self.stage])
        if values["save_every"] is None:
            values["save_every"] = values["val_every"]
        config = TrainConfig(**values)
        for key in ("batch_size", "grad_accum", "val_every", "save_every"):
            if getattr(config, key) is None or int(getattr(config, key)) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(config, key)!r}")
        if config.max_steps is not None and config.max_steps < 1:
            raise ValueError(f"--max-steps must be a positive integer, got {config.max_steps}")
        if config.max_steps is None and not config.epochs:
            raise ValueError("give --max-steps (or epochs) for this preset and stage")
        if config.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"--frozen-dtype must be one of {', '.join(FROZEN_DTYPES)}, got {config.frozen_dtype!r}")
        if config.frozen_dtype == "bfloat16" and config.precision == "fp32":
            raise ValueError("--frozen-dtype bfloat16 needs bf16 autocast: use --precision auto or bf16, not fp32")
        if config.init and any(config.model_overrides.get(k) for k in WEIGHT_SOURCES):
            raise ValueError("--sam-checkpoint/--clip-dir/--lm-dir build a fresh model: leave out --init (its checkpoint has the weights)")
        for key in WEIGHT_SOURCES:
            source = config.model_overrides.get(key)
            if source and not Path(source).exists():
                raise FileNotFoundError(f"--{key.replace('_', '-')} {source} does not exist")
        if config.augmentation not in ("basic", "scanner"):
            raise ValueError(f"--augmentation must be basic or scanner, got {config.augmentation!r}")
        if not config.lr or config.lr <= 0:
            raise ValueError(f"--lr must be positive, got {config.lr!r}")
        bad = [t for t, w in config.ratio.items() if w < 0]
        if bad or not any(w > 0 for w in config.ratio.values()):
            raise ValueError(f"--ratio needs non-negative weights with a positive sum, got {config.ratio}")
        if not config.manifest_path().is_file():
            raise FileNotFoundError(f"no manifest at {config.manifest_path()}: run `raddiagseg build` first or fix --data")
        if config.init and not (Path(config.init) / "config.json").is_file():
            raise FileNotFoundError(f"--init {config.init} is not a checkpoint folder (no config.json)")
        return config

    def effective_batch(self):
        return int(self.batch_size) * int(self.grad_accum)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


def parse_ratio_text(text, stage):
    """Parse --ratio: 'vqaseg=0.6,vqa=0.4' or '0.6:0.4' (weights in the stage's task order)."""
    tasks = list(STAGE_TASKS[stage])
    text = text.strip()
    if "=" in text:
        out = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            out[name.strip()] = float(value)
        return out
    values = [float(v) for v in text.split(":")]
    if len(values) != len(tasks):
        raise ValueError(f"--ratio for {stage} needs {len(tasks)} weights ({':'.join(tasks)}), got {text!r}")
    return dict(zip(tasks, values))
