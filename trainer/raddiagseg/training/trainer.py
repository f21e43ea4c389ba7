"""The training loop of one stage (paper 001, "Training details"; appendix Table 7).

AdamW on the model's trainable parameters (LoRA, projector, mask decoder, seg-token rows),
linear warmup + cosine decay, gradient accumulation, bf16 autocast where it pays, DDP under
torchrun (DeepSpeed ZeRO-2 optionally), validation with `evaluate_model` every `val_every`
steps keeping the best checkpoint, and a resumable `last` checkpoint every `save_every` steps.

Run folder layout: `best/` (model folder, the result), `last/` (model folder + training_state.pt),
`metrics.csv`, `tb/` (TensorBoard), `loss_curves.png`, `config.json`, `result.json`.
"""

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from raddiagseg.training import checkpoints, distributed, selection
from raddiagseg.training.batches import EpochIndexed, StepBatchPlan
from raddiagseg.training.config import TrainConfig
from raddiagseg.training.metrics_log import MetricsLog

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "loss_text", "loss_bce", "loss_dice", "n_masks")


@dataclass
class TrainResult:
    best_checkpoint: Path
    best_metric: Optional[float]
    metric_name: str
    best_step: int
    last_checkpoint: Path
    steps: int
    wall_time_s: float
    run_dir: Path


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision, device, frozen_dtype="float32"):
    """bf16 when asked, or on `auto` on a GPU that supports it or when the frozen weights are bf16 (the trainable
    fp32 parts then need autocast to meet them); None means full fp32.

    On CPU `auto` otherwise stays fp32: measured on the 2-core demo machine, bf16 autocast made the tiny
    demo model's step slower, not faster (see the README's training section).
    """
    if precision == "bf16" or (precision == "auto" and frozen_dtype == "bfloat16"):
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _make_model(config, device):
    """--init's checkpoint or a fresh `preset` model (weights from its sources), built directly in the frozen dtype."""
    dtype = _dtype(config.frozen_dtype)
    if config.init:
        from raddiagseg import load_model

        model = load_model(config.init, device=device, frozen_dtype=dtype)
    else:
        from raddiagseg import build_model

        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # a bf16 paper LM never exists in fp32 (10.5 GB)
        try:
            model = build_model(config.preset, **(config.model_overrides or {}))
        finally:
            torch.set_default_dtype(previous)
        model.to(device)
    if config.rvls2m is not None:
        settings = dict(config.rvls2m)
        model.set_rvls2m(settings.pop("enabled", True), **settings)
    if config.trainable:
        model.set_trainable(**config.trainable)
    return model


def _make_dataset(config):
    from raddiagseg.data.dataset import ManifestDataset

    tasks = [t for t, w in config.ratio.items() if w > 0]
    return ManifestDataset(
        str(config.manifest_path()), split="train", tasks=tasks, augment=config.augment and config.augmentation,
        seed=config.seed, synonym_prob=config.synonym_prob, cot=config.cot,
    )


def _epoch_order_fn(config, dataset):
    """epoch -> list of indices of one epoch of the task-ratio sampler (world size 1: sharding is ours)."""
    from raddiagseg.data.dataset import TaskRatioSampler

    sampler = TaskRatioSampler(dataset, ratios=dict(config.ratio), num_samples=len(dataset), seed=config.seed)

    def order(epoch):
        sampler.set_epoch(epoch)
        return list(sampler)

    return order


def _freeze_all_but_trainable(model):
    trainable = [p for p in model.trainable_parameters()]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    for p in trainable:
        p.requires_grad_(True)
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return trainable


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value) if value is not None else 0.0


def _resolve_resume(run_dir, config):
    """The `last` checkpoint folder to resume from, or None (starting fresh)."""
    if not config.resume:
        return None
    folder = checkpoints.resolve_checkpoint(run_dir / "last")
    if folder is None or checkpoints.read_training_state(folder) is None:
        log.warning("--resume: no resumable checkpoint in %s, starting from step 0", run_dir)
        return None
    return folder


def train(config: TrainConfig, progress: Optional[Callable[[dict], None]] = None, *, model=None, dataset=None,
          epoch_order=None, collate=None, evaluate=None, progress_on_all_ranks=False):
    """Train one stage; returns TrainResult (best checkpoint, its metric).

    `progress(dict)` is called on rank 0 after every optimizer step with step, total_steps, the loss
    parts, val_metric (latest) and eta_s. The keyword-only arguments replace the parts that are
    normally built from the config (the model, the dataset and its sampler order, the collate
    function, the validation function `evaluate(model) -> float|None`): for the app and for tests.
    `progress_on_all_ranks` calls `progress` on every rank (its dict then has `rank`), e.g. to check sync.
    """
    config = config.resolved()
    ctx = distributed.init_distributed(config.device)
    try:
        return _train(config, ctx, progress, model, dataset, epoch_order, collate, evaluate, progress_on_all_ranks)
    finally:
        distributed.shutdown(ctx)


def _train(config, ctx, progress, model, dataset, epoch_order, collate, evaluate, progress_on_all_ranks):
    started = time.perf_counter()
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_folder, state = _resume_state(run_dir, config)
    seed_everything(config.seed + ctx.rank)
    model = _prepare_model(config, ctx, model, resume_folder)
    trainable = _freeze_all_but_trainable(model)

    if dataset is None:
        dataset = _make_dataset(config)
    if epoch_order is None:
        epoch_order = _epoch_order_fn(config, dataset)
    micro_batch, accum = distributed.split_effective_batch(config.batch_size, config.grad_accum, ctx.world_size)
    epoch_length = len(epoch_order(0))
    if epoch_length == 0:
        raise ValueError(f"{config.manifest_path()} has no training samples for tasks {sorted(config.ratio)}")
    max_steps = config.max_steps or math.ceil(config.epochs * epoch_length / config.effective_batch())

    loop = _Loop(config, ctx, model, trainable, run_dir, max_steps, accum, _metric_name(config, evaluate), evaluate)
    loop.build_optimizer(state, micro_batch)
    loop.plan = StepBatchPlan(epoch_order, micro_batch, accum, ctx.world_size, ctx.rank, loop.step, max_steps)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset), batch_sampler=loop.plan, collate_fn=collate or model.processor.collate,
        num_workers=config.num_workers, persistent_workers=False, pin_memory=ctx.device.type == "cuda",
    )
    if ctx.is_main:
        (run_dir / "config.json").write_text(config.to_json())
        log.info(
            "%s/%s: %d steps (from %d), effective batch %d = %d ranks x %d micro x %d accum, lr %.2g, warmup %d, "
            "%.2f M trainable params, %s%s",
            config.preset, config.stage, max_steps, loop.step, config.effective_batch(), ctx.world_size,
            micro_batch, accum, config.lr, loop.warmup, sum(p.numel() for p in trainable) / 1e6, ctx.device,
            " bf16" if loop.bf16 else "",
        )
    loop.run(loader, started, progress, progress_on_all_ranks)
    return _finish(loop, started)


def _resume_state(run_dir, config):
    """(the `last` folder to resume from or None, its training state or None); refuses a changed effective batch."""
    resume_folder = _resolve_resume(run_dir, config)
    state = checkpoints.read_training_state(resume_folder) if resume_folder else None
    if state is not None and state.get("effective_batch") != config.effective_batch():
        raise ValueError(
            f"--resume: the run in {run_dir} used effective batch {state.get('effective_batch')}, "
            f"this command asks for {config.effective_batch()}; keep --batch-size x --grad-accum the same"
        )
    return resume_folder, state


def _prepare_model(config, ctx, model, resume_folder):
    """The model to train, on the device in train mode: the caller's (resumed weights loaded into it), the `last`
    checkpoint, or --init / a fresh preset model; frozen parameters in `config.frozen_dtype`, trainable ones fp32."""
    if model is None:
        if resume_folder is not None:
            from raddiagseg import load_model

            model = load_model(resume_folder, device=ctx.device, frozen_dtype=_dtype(config.frozen_dtype))
        else:
            model = _make_model(config, ctx.device)
    elif resume_folder is not None:
        _load_weights_into(model, resume_folder)
    model.to(ctx.device)
    if config.frozen_dtype != "float32":  # also after set_trainable: parameters it made trainable become fp32
        model.set_frozen_dtype(_dtype(config.frozen_dtype))
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return model


class _Loop:
    """One stage's optimisation state and its steps: micro-batch forward/backward, the optimiser step, validation
    keeping `best/`, the `last/` checkpoint, and the per-step reports (metrics.csv, progress bar, callback)."""

    def __init__(self, config, ctx, model, trainable, run_dir, max_steps, accum, metric_name, evaluate):
        self.config, self.ctx, self.model, self.trainable, self.run_dir = config, ctx, model, trainable, run_dir
        self.max_steps, self.accum, self.metric_name, self.evaluate = max_steps, accum, metric_name, evaluate
        self.bf16 = autocast_dtype(config.precision, ctx.device, config.frozen_dtype)
        self.step, self.best_metric, self.best_step, self.val_metric = 0, None, 0, None
        self.engine = self.wrapped = self.optimizer = self.scheduler = self.plan = None
        self.metrics = self.bar = None

    def build_optimizer(self, state, micro_batch):
        """AdamW + warmup/cosine schedule (restored from `state` when resuming), wrapped for DDP or DeepSpeed."""
        config, ctx = self.config, self.ctx
        self.warmup = int(config.warmup if config.warmup >= 1 else round(config.warmup * self.max_steps))
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, num_warmup_steps=self.warmup,
                                                         num_training_steps=self.max_steps)
        if state is not None:
            if state.get("optimizer") is None:
                raise ValueError(f"{self.run_dir / 'last'} was written by --engine deepspeed and holds no optimizer "
                                 "state to resume: start a new run from it with --init")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step", 0)
            rngs = state.get("rng_per_rank") or []
            if ctx.rank < len(rngs) and len(rngs) == ctx.world_size:
                checkpoints.set_rng_state(rngs[ctx.rank])
            log.info("resuming %s at step %d of %d", self.run_dir, self.step, self.max_steps)
        if config.engine == "deepspeed":
            self.model.decode_every_batch = True  # the same graph on every rank (RadDiagSegModel.forward)
            self.engine, self.optimizer, self.scheduler = distributed.deepspeed_engine(
                self.model, self.optimizer, self.scheduler, micro_batch, self.accum, ctx.world_size, self.bf16 is not None,
                config.max_grad_norm)
            self.wrapped = self.engine
        else:
            self.wrapped = distributed.wrap_ddp(self.model, ctx)

    def run(self, loader, started, progress, progress_on_all_ranks):
        ctx = self.ctx
        self.metrics = MetricsLog(self.run_dir, resume_step=self.step) if ctx.is_main else None
        if ctx.is_main and self.config.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=self.step, desc=f"{self.config.stage}", unit="step",
                            dynamic_ncols=True)
        step_started = time.perf_counter()
        window = []
        micro_index = 0
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
        try:
            for batch in loader:
                last_micro = micro_index == self.accum - 1
                sums += self.micro_step(_to_device(batch, ctx.device), last_micro)
                micro_index += 1
                if not last_micro:
                    continue
                grad_norm = self.optimizer_step()
                parts = distributed.all_reduce_mean(sums / self.accum, ctx)
                parts = {k: float(v) for k, v in zip(LOSS_KEYS, parts)}
                sums.zero_()
                micro_index = 0
                now = time.perf_counter()
                window = (window + [now - step_started])[-20:]
                step_started = now
                validated = self.validate_and_save()
                self.report(parts, grad_norm, window, validated, now - started, progress, progress_on_all_ranks)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.metrics is not None:
                self.metrics.close()

    def micro_step(self, batch, last_micro):
        """Forward and backward of one micro-batch (gradients synced only on the last of an accumulation) -> loss parts."""
        sync_context = contextlib.nullcontext()
        if self.engine is None and self.ctx.distributed and not last_micro:
            sync_context = self.wrapped.no_sync()
        with sync_context:
            with torch.autocast(self.ctx.device.type, dtype=self.bf16, enabled=self.bf16 is not None):
                out = self.wrapped(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {self.step + 1}: lower --lr or check the data")
            if self.engine is not None:  # DeepSpeed counts micro-batches: it steps at its accumulation boundary
                self.engine.backward(loss)
                self.engine.step()
            else:
                (loss / self.accum).backward()
        return torch.tensor([_scalar(out.get(k)) for k in LOSS_KEYS], dtype=torch.float64)

    def optimizer_step(self):
        """One optimiser step (gradient clipping, schedule) -> the gradient norm before clipping, or None."""
        grad_norm = None
        if self.engine is not None:  # stepped in micro_step
            norm = self.engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        else:
            if self.config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def validate_and_save(self):
        """Validate every `val_every` steps (and at the end), writing `best/` when the metric improved; save `last/`
        every `save_every` steps -> whether this step validated."""
        config, ctx, step = self.config, self.ctx, self.step
        validated = step % config.val_every == 0 or step == self.max_steps
        if validated:
            self.val_metric = _validate(self.model, config, ctx, self.evaluate, self.bf16)
            improved = self.val_metric is not None and (self.best_metric is None or self.val_metric > self.best_metric)
            if self.val_metric is None and self.best_metric is None:
                improved = True  # no metric at all: the latest checkpoint is the best we know
            if improved:
                self.best_metric, self.best_step = self.val_metric, step
                if ctx.is_main:
                    checkpoints.write_checkpoint(
                        self.model, self.run_dir / "best",
                        info={"step": step, "metric": self.val_metric, "metric_name": self.metric_name},
                        dtype=_dtype(config.save_dtype))
            distributed.barrier(ctx)
        if step % config.save_every == 0 or step == self.max_steps:
            _save_last(self.model, self.optimizer, self.scheduler, config, ctx, self.run_dir, step, self.best_metric,
                       self.best_step, self.plan)
        return validated

    def report(self, parts, grad_norm, window, validated, wall_s, progress, progress_on_all_ranks):
        """The step's row in metrics.csv (and the loss plot after a validation), the progress bar, the callback."""
        ctx, step, val_metric = self.ctx, self.step, self.val_metric
        lr = self.scheduler.get_last_lr()[0]
        if ctx.is_main:
            row = dict(parts, step=step, lr=lr, grad_norm=grad_norm,
                       samples_per_s=self.config.effective_batch() / max(window[-1], 1e-9),
                       val_metric=val_metric if validated else None, wall_s=wall_s)
            self.metrics.log(row)
            if validated:
                self.metrics.plot()
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{parts['loss']:.3f}", text=f"{parts['loss_text']:.3f}",
                                     bce=f"{parts['loss_bce']:.3f}", dice=f"{parts['loss_dice']:.3f}",
                                     val="-" if val_metric is None else f"{val_metric:.3f}")
        if progress is not None and (ctx.is_main or progress_on_all_ranks):
            eta = (sum(window) / len(window)) * (self.max_steps - step)
            progress(dict(step=step, total_steps=self.max_steps, loss=parts["loss"], loss_text=parts["loss_text"],
                          loss_bce=parts["loss_bce"], loss_dice=parts["loss_dice"], n_masks=parts["n_masks"],
                          lr=lr, val_metric=val_metric, eta_s=eta, rank=ctx.rank,
                          sample_indices=[i for b in self.plan.rank_micro_batches(step - 1) for _, i in b]))


def _finish(loop, started):
    """The TrainResult; rank 0 writes result.json and the final loss plot."""
    wall = time.perf_counter() - started
    best = loop.run_dir / "best"
    result = TrainResult(best_checkpoint=best, best_metric=loop.best_metric, metric_name=loop.metric_name,
                         best_step=loop.best_step, last_checkpoint=loop.run_dir / "last", steps=loop.step,
                         wall_time_s=wall, run_dir=loop.run_dir)
    if loop.ctx.is_main:
        if loop.metrics is not None and loop.metrics.rows:
            MetricsLog.plot(loop.metrics)
        (loop.run_dir / "result.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}, indent=2))
        log.info("done: %d steps in %.0f s; best %s = %s at step %d -> %s", loop.step, wall, loop.metric_name,
                 loop.best_metric, loop.best_step, best)
    distributed.barrier(loop.ctx)
    return result


def _dtype(name):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _metric_name(config, evaluate):
    if evaluate is not None:
        return getattr(evaluate, "metric_name", "val_metric")
    return selection.metric_name(config.stage)


def _validate(model, config, ctx, evaluate, autocast=None):
    """Rank 0 evaluates the model on the validation split (under the training's autocast); every rank gets the number."""
    value = None
    if ctx.is_main:
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(ctx.device.type, dtype=autocast, enabled=autocast is not None):
                value = evaluate(model) if evaluate is not None else _evaluate_on_manifest(model, config)
        finally:
            model.train(was_training)
    return distributed.broadcast_object(value, ctx)


def _evaluate_on_manifest(model, config):
    from raddiagseg.data.records import InputFileError
    from raddiagseg.evaluation import evaluate_model

    tasks = ["vqaseg"] if config.stage == "finetune" else ["refseg"]
    try:
        report = evaluate_model(model, str(config.manifest_path()), split=config.val_split, tasks=tasks,
                                max_samples=config.val_samples, progress=False, cot=config.cot)
    except InputFileError as exc:  # an empty val split must not kill a long run: report it and keep the latest model
        log.warning("validation skipped: %s", exc)
        return None
    return selection.selection_score(report, config.stage)


def _save_last(model, optimizer, scheduler, config, ctx, run_dir, step, best_metric, best_step, plan):
    rngs = distributed.gather_objects(checkpoints.rng_state(), ctx)
    if ctx.is_main:
        epoch, offset = plan.position(step)
        state = {
            "step": step,
            # DeepSpeed's ZeRO optimizer holds one partition per rank: its state is not resumable from rank 0's
            "optimizer": None if config.engine == "deepspeed" else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_per_rank": rngs,
            "data": {"seed": config.seed, "epoch": epoch, "offset": offset, "samples_seen": step * plan.step_size},
            "effective_batch": config.effective_batch(),
            "world_size": ctx.world_size,
            "best_metric": best_metric,
            "best_step": best_step,
            "config": dataclasses.asdict(config),
        }
        checkpoints.write_checkpoint(model, run_dir / "last", training_state=state,
                                     info={"step": step, "best_metric": best_metric, "best_step": best_step})
    distributed.barrier(ctx)


def _load_weights_into(model, folder):
    """Load a checkpoint's weights into an already built model (used when the caller supplies the model)."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    weights = load_file(str(path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"{path} does not match the model: unexpected keys {unexpected[:3]}...")
