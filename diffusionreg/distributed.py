"""Small helpers for training under ``torchrun`` (DDP; gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` as ``torchrun`` sets them (``(0, 1)`` in a plain process)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def any_rank(flag: bool, world_size: int) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "time is up", "checkpoint now").

    Ranks must take such decisions together, or one would wait forever in a collective the others
    never enter. With a single process this is just ``flag``.
    """
    if world_size <= 1:
        return flag
    vote = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        vote = vote.cuda()
    dist.all_reduce(vote)
    return bool(vote.item() > 0)


def gather_to_all(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on every rank.

    A CPU tensor such as a ``torch.Generator`` state: gloo gathers CPU tensors, which is why the
    process group is gloo even on GPUs.
    """
    if world_size <= 1:
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return gathered


def start_process_group(world_size: int, backend: str = "gloo", timeout: timedelta | None = None) -> bool:
    """Join the ``torchrun`` process group (default gloo: it runs on CPU and GPU alike; ``nccl``
    needs ``torch.cuda.set_device`` first). ``timeout`` bounds each collective (torch's default
    when None): a barrier waiting for slower ranks needs more.

    Returns True when this call created the group, so the caller must end it with
    :func:`end_process_group`; an undestroyed gloo group can abort the process at exit.
    """
    if world_size <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend, **({} if timeout is None else {"timeout": timeout}))
    return True


def end_process_group(owns_group: bool, wait: bool = True) -> None:
    """Wait for every rank (unless ``wait`` is False: after an error the others may never come),
    then destroy the group if this process created it."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        if owns_group:
            dist.destroy_process_group()


def share_from_rank0(value, world_size: int):
    """Rank 0's ``value`` (any picklable object) on every rank; with a single process just ``value``."""
    if world_size <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
