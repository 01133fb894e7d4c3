"""Data-parallel plumbing for ``torchrun``: process group, sharding, rank-0 I/O, metric reduction.

``torchrun --nproc_per_node N -m ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup` then joins the
process group (gloo on CPU, nccl on CUDA). Each global batch of B examples is split into N contiguous shards
of B/N (the DistributedSampler-equivalent for in-memory data), so gradients averaged by
DistributedDataParallel equal the single-process gradient of the same global batch.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun): {exc}") from None


def setup(backend: str, device_type: str) -> DistContext:
    """Join the process group when WORLD_SIZE > 1 (or reuse an initialised one)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; valid: {', '.join(BACKENDS)}")
    rank, world, local = env_world()
    if world <= 1:
        return DistContext()
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use distributed.backend: gloo on CPU")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, False)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, True)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        # free DDP reducers (reference cycles) and their pending gloo work while the interpreter is fully
        # alive: left to interpreter finalisation they can abort the process ("terminate called ...")
        gc.collect()
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of a batch of ``n`` that ``rank`` of ``world`` owns (contiguous, sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_global_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(
            f"run.batch_size ({batch_size}) must be divisible by the number of processes ({world}) so that "
            "every shard has the same size and averaged gradients equal the single-process ones"
        )


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a float64 tensor of metric accumulators over ranks (identity in a single process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (used to stop all ranks together on SIGTERM)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj_rank0, obj_rank1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """(core, trainer): ``core`` (SyncBatchNorm-converted if asked) and the DDP wrapper used for training steps."""
    if not ctx.enabled:
        return model, model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(
                "distributed.sync_bn needs CUDA devices (torch's SyncBatchNorm is GPU-only); on CPU set "
                "distributed.sync_bn: false (batch-norm statistics are then per process) or use a model without BN"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # buffers (BN running statistics) are broadcast from rank 0 before every forward: DDP's default
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    return model, ddp
