"""Process setup: one process, or DDP under torchrun (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(pref)


def init(device_pref: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def wrap(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``module`` under DDP when there are several processes. Buffers are not re-sent every
    forward (``forward_sync_buffers=False``, torch's successor of ``broadcast_buffers=False``;
    DDP still syncs them once at wrapping): the methods' buffers are constants (one-hot and row
    indices, VeRA's frozen A and B), so a per-forward broadcast is a collective for nothing.
    Gradients are views into DDP's buckets, not copies (``gradient_as_bucket_view``)."""
    if not d.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
        forward_sync_buffers=False, gradient_as_bucket_view=True)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank0_decides(flag: bool, d: Dist) -> bool:
    """Rank 0's ``flag`` on every rank (a decision by a clock, which ranks do not share)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
