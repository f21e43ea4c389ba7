"""Process-group setup for `torchrun` (DDP, gloo on CPU / nccl on GPU) and the optional DeepSpeed ZeRO-2 engine.

A single process (plain `raddiagseg train`) is world size 1 and uses none of this machinery
beyond `DistContext`, so the same loop runs on a laptop and under `torchrun --nproc_per_node K`.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def pick_device(preference=None, local_rank=0):
    if preference:
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {preference} asked for, but no CUDA GPU is available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference=None):
    """Join the process group torchrun set up (WORLD_SIZE > 1), else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    initialised_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        initialised_here = True
    return DistContext(rank, world_size, local_rank, device, initialised_here)


def shutdown(ctx):
    if ctx.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def split_effective_batch(batch_size, grad_accum, world_size):
    """Per-rank (micro_batch, grad_accum) so that micro_batch x grad_accum x world_size == batch_size x grad_accum.

    Gradient accumulation steps are shared out first (each rank then sees exactly the micro-batches
    a single process would, so losses and gradients match a 1-process run); else the micro-batch is split.
    """
    if world_size == 1:
        return batch_size, grad_accum
    if grad_accum % world_size == 0:
        return batch_size, grad_accum // world_size
    if (batch_size * grad_accum) % world_size == 0 and batch_size % world_size == 0:
        return batch_size // world_size, grad_accum
    raise ValueError(
        f"effective batch {batch_size}x{grad_accum} cannot be shared by {world_size} processes: "
        f"make --grad-accum or --batch-size a multiple of {world_size}"
    )


def all_reduce_mean(values, ctx):
    """Mean over ranks of a 1-D float tensor (identity for one process)."""
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ctx.world_size


def broadcast_object(obj, ctx):
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, ctx):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


def wrap_ddp(model, ctx):
    """DistributedDataParallel over the trainable parameters (unused ones allowed: a VQA-only micro-batch has no masks)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def deepspeed_engine(model, optimizer, scheduler, micro_batch, grad_accum, world_size, bf16, max_grad_norm):
    """DeepSpeed ZeRO-2 engine around our model, optimizer and scheduler (paper 001 trained this way)."""
    try:
        import deepspeed
    except ImportError:
        raise ValueError("--engine deepspeed needs the deepspeed package (pip install deepspeed); use --engine ddp") from None
    if "WORLD_SIZE" not in os.environ:  # one process without torchrun: else DeepSpeed looks for MPI to find its rank
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": bool(bf16)},
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler
