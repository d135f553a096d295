"""Data-parallel runs across processes started by `torchrun`: joining the process group and the few collectives
the SAE trainer needs.

Every helper is a no-op in a single process, so the trainer reads the same with one process or many. Data
parallelism here is plain gradient averaging: each rank computes the gradients of the mean loss over its slice of
the global batch, `average_` makes them the gradients of the mean over the whole batch, and every rank then takes
the same optimiser step — the same update one process would make on the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saelab.errors import SaelabError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or any launcher that sets RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes in the environment; return the device this rank computes on.

    gloo on CPU, NCCL on CUDA, where each rank takes the GPU of its LOCAL_RANK.
    """
    if not dist.is_available():
        raise SaelabError("this torch build has no torch.distributed; run a single process (no torchrun)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise SaelabError(f"rank {local_rank} has no GPU of its own; start as many processes as GPUs")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor (all of one dtype), in place, by its mean over the ranks, in one collective."""
    tensors = list(tensors)
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world()[1]
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


def sum_(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks, in place."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's `[rows, ...]` tensor stacked in rank order (all ranks must pass the same shape)."""
    size = world()[1]
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    size = world()[1]
    if size == 1:
        return [obj]
    objects: list[Any] = [None] * size
    dist.all_gather_object(objects, obj)
    return objects


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
