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


def autocast_dtype(precision, device):
    """bf16 when asked, or on `auto` on a GPU that supports it; None means full fp32.

    On CPU `auto` stays fp32: measured on the 2-core demo machine, bf16 autocast made the tiny
    demo model's step slower, not faster (see the README's training section).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _make_model(config, device):
    if config.init:
        from raddiagseg import load_model

        model = load_model(config.init, device=device)
    else:
        from raddiagseg import build_model

        model = build_model(config.preset, **(config.model_overrides or {})).to(device)
    if config.rvls2m is not None:
        settings = dict(config.rvls2m)
        model.set_rvls2m(settings.pop("enabled", True), **settings)
    if config.trainable:
        model.set_trainable(**config.trainable)
    return model


def _make_dataset(config, model):
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
    resume_folder = _resolve_resume(run_dir, config)
    state = checkpoints.read_training_state(resume_folder) if resume_folder else None
    if state is not None and state.get("effective_batch") != config.effective_batch():
        raise ValueError(
            f"--resume: the run in {run_dir} used effective batch {state.get('effective_batch')}, "
            f"this command asks for {config.effective_batch()}; keep --batch-size x --grad-accum the same"
        )
    seed_everything(config.seed + ctx.rank)

    # model: resume from `last`, else --init / a fresh preset model
    if model is None:
        if resume_folder is not None:
            from raddiagseg import load_model

            model = load_model(resume_folder, device=ctx.device)
        else:
            model = _make_model(config, ctx.device)
    elif resume_folder is not None:
        _load_weights_into(model, resume_folder)
    model.to(ctx.device)
    model.train()
    trainable = _freeze_all_but_trainable(model)
    n_trainable = sum(p.numel() for p in trainable)

    if dataset is None:
        dataset = _make_dataset(config, model)
    if epoch_order is None:
        epoch_order = _epoch_order_fn(config, dataset)
    if collate is None:
        collate = model.processor.collate

    micro_batch, accum = distributed.split_effective_batch(config.batch_size, config.grad_accum, ctx.world_size)
    epoch_length = len(epoch_order(0))
    if epoch_length == 0:
        raise ValueError(f"{config.manifest_path()} has no training samples for tasks {sorted(config.ratio)}")
    max_steps = config.max_steps or math.ceil(config.epochs * epoch_length / config.effective_batch())
    warmup = int(config.warmup if config.warmup >= 1 else round(config.warmup * max_steps))

    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)

    start_step, best_metric, best_step, metric_name = 0, None, 0, _metric_name(config, evaluate)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        best_metric, best_step = state.get("best_metric"), state.get("best_step", 0)
        rngs = state.get("rng_per_rank") or []
        if ctx.rank < len(rngs) and len(rngs) == ctx.world_size:
            checkpoints.set_rng_state(rngs[ctx.rank])
        log.info("resuming %s at step %d of %d", run_dir, start_step, max_steps)

    bf16 = autocast_dtype(config.precision, ctx.device)
    engine = None
    if config.engine == "deepspeed":
        engine, optimizer, scheduler = distributed.deepspeed_engine(
            model, optimizer, scheduler, micro_batch, accum, ctx.world_size, bf16 is not None, config.max_grad_norm)
        wrapped = engine
    else:
        wrapped = distributed.wrap_ddp(model, ctx)

    plan = StepBatchPlan(epoch_order, micro_batch, accum, ctx.world_size, ctx.rank, start_step, max_steps)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset), batch_sampler=plan, collate_fn=collate, num_workers=config.num_workers,
        persistent_workers=False, pin_memory=ctx.device.type == "cuda",
    )

    if ctx.is_main:
        (run_dir / "config.json").write_text(config.to_json())
        log.info(
            "%s/%s: %d steps (from %d), effective batch %d = %d ranks x %d micro x %d accum, lr %.2g, warmup %d, "
            "%.2f M trainable params, %s%s",
            config.preset, config.stage, max_steps, start_step, config.effective_batch(), ctx.world_size,
            micro_batch, accum, config.lr, warmup, n_trainable / 1e6, ctx.device, " bf16" if bf16 else "",
        )
    metrics = MetricsLog(run_dir, resume_step=start_step) if ctx.is_main else None
    bar = None
    if ctx.is_main and config.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc=f"{config.stage}", unit="step", dynamic_ncols=True)

    val_metric = None
    step = start_step
    step_started = time.perf_counter()
    window = []
    micro_index = 0
    sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
    try:
        for batch in loader:
            batch = _to_device(batch, ctx.device)
            last_micro = micro_index == accum - 1
            sync_context = contextlib.nullcontext()
            if engine is None and ctx.distributed and not last_micro:
                sync_context = wrapped.no_sync()
            with sync_context:
                with torch.autocast(ctx.device.type, dtype=bf16, enabled=bf16 is not None):
                    out = wrapped(batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at step {step + 1}: lower --lr or check the data")
                if engine is not None:
                    engine.backward(loss)
                else:
                    (loss / accum).backward()
            sums += torch.tensor([_scalar(out.get(k)) for k in LOSS_KEYS], dtype=torch.float64)
            micro_index += 1
            if not last_micro:
                continue

            # one optimizer step
            grad_norm = None
            if engine is not None:
                engine.step()
            else:
                if config.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            parts = distributed.all_reduce_mean(sums / accum, ctx)
            parts = {k: float(v) for k, v in zip(LOSS_KEYS, parts)}
            sums.zero_()
            micro_index = 0

            now = time.perf_counter()
            window.append(now - step_started)
            window = window[-20:]
            step_started = now
            eta = (sum(window) / len(window)) * (max_steps - step)

            validated = step % config.val_every == 0 or step == max_steps
            if validated:
                val_metric = _validate(model, config, ctx, evaluate)
                improved = val_metric is not None and (best_metric is None or val_metric > best_metric)
                if val_metric is None and best_metric is None:
                    improved = True  # no metric at all: the latest checkpoint is the best we know
                if improved:
                    best_metric, best_step = val_metric, step
                    if ctx.is_main:
                        checkpoints.write_checkpoint(
                            model, run_dir / "best", info={"step": step, "metric": val_metric, "metric_name": metric_name},
                            dtype=_dtype(config.save_dtype))
                distributed.barrier(ctx)
            if step % config.save_every == 0 or step == max_steps:
                _save_last(model, optimizer, scheduler, config, ctx, run_dir, step, best_metric, best_step, plan)

            if ctx.is_main:
                row = dict(parts, step=step, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           samples_per_s=config.effective_batch() / max(window[-1], 1e-9),
                           val_metric=val_metric if validated else None, wall_s=now - started)
                metrics.log(row)
                if validated:
                    metrics.plot()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", text=f"{parts['loss_text']:.3f}",
                                    bce=f"{parts['loss_bce']:.3f}", dice=f"{parts['loss_dice']:.3f}",
                                    val="-" if val_metric is None else f"{val_metric:.3f}")
            if progress is not None and (ctx.is_main or progress_on_all_ranks):
                progress(dict(step=step, total_steps=max_steps, loss=parts["loss"], loss_text=parts["loss_text"],
                              loss_bce=parts["loss_bce"], loss_dice=parts["loss_dice"], n_masks=parts["n_masks"],
                              lr=scheduler.get_last_lr()[0], val_metric=val_metric, eta_s=eta, rank=ctx.rank,
                              sample_indices=[i for b in plan.rank_micro_batches(step - 1) for _, i in b]))
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()

    wall = time.perf_counter() - started
    best = run_dir / "best"
    result = TrainResult(best_checkpoint=best, best_metric=best_metric, metric_name=metric_name, best_step=best_step,
                         last_checkpoint=run_dir / "last", steps=step, wall_time_s=wall, run_dir=run_dir)
    if ctx.is_main:
        if metrics is not None and metrics.rows:
            MetricsLog.plot(metrics)
        (run_dir / "result.json").write_text(json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}, indent=2))
        log.info("done: %d steps in %.0f s; best %s = %s at step %d -> %s", step, wall, metric_name, best_metric,
                 best_step, best)
    distributed.barrier(ctx)
    return result


def _dtype(name):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _metric_name(config, evaluate):
    if evaluate is not None:
        return getattr(evaluate, "metric_name", "val_metric")
    return selection.metric_name(config.stage)


def _validate(model, config, ctx, evaluate):
    """Rank 0 evaluates the model on the validation split; every rank gets the number."""
    value = None
    if ctx.is_main:
        was_training = model.training
        model.eval()
        try:
            if evaluate is not None:
                value = evaluate(model)
            else:
                value = _evaluate_on_manifest(model, config)
        finally:
            model.train(was_training)
    return distributed.broadcast_object(value, ctx)


def _evaluate_on_manifest(model, config):
    from raddiagseg.evaluation import evaluate_model

    tasks = ["vqaseg"] if config.stage == "finetune" else ["refseg"]
    try:
        report = evaluate_model(model, str(config.manifest_path()), split=config.val_split, tasks=tasks,
                                max_samples=config.val_samples, progress=False, cot=config.cot)
    except Exception as exc:  # an empty val split must not kill a long run: report it and keep the latest model
        if type(exc).__name__ == "BenchmarkInputError":
            log.warning("validation skipped: %s", exc)
            return None
        raise
    return selection.selection_score(report, config.stage)


def _save_last(model, optimizer, scheduler, config, ctx, run_dir, step, best_metric, best_step, plan):
    rngs = distributed.gather_objects(checkpoints.rng_state(), ctx)
    if ctx.is_main:
        epoch, offset = plan.position(step)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
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
