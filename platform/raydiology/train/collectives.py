"""Every collective raydiology issues, on the device its process group serves.

Ray Train gives GPU workers an NCCL group and CPU workers a gloo group; NCCL takes only
CUDA tensors, gloo only CPU ones. Callers (the loop, objectives, validation, tokenizers) hand
tensors from wherever they live; these functions move them to the group's device and the
result back. Outside a process group (one process, tests, `bench step`) each is the
single-rank answer. DeepSpeed's own collectives are DeepSpeed's business.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Op = Literal["sum", "min", "max"]
T = TypeVar("T")
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def device_for_backend(backend: str) -> torch.device:
    """NCCL serves this process's current CUDA device; every other backend the CPU."""
    if backend.lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_device() -> torch.device:
    return device_for_backend(str(dist.get_backend())) if active() else torch.device("cpu")


def all_reduce_(tensor: Tensor, op: Op = "sum") -> Tensor:
    """Reduce `tensor` over every rank, in place; returns it."""
    if not active():
        return tensor
    on_group = tensor.to(group_device())  # the same tensor when already there
    dist.all_reduce(on_group, op=_OPS[op])
    if on_group is not tensor:
        tensor.copy_(on_group)
    return tensor


def all_gather(tensor: Tensor) -> list[Tensor]:
    """[...] on each rank -> every rank's [...] in rank order, on `tensor`'s device, detached."""
    if not active():
        return [tensor.detach()]
    local = tensor.detach().contiguous().to(group_device())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return [part.to(tensor.device) for part in parts]


def agree_min(value: int) -> int:
    """The smallest `value` any rank holds."""
    if not active():
        return value
    return int(all_reduce_(torch.tensor([value], dtype=torch.int64), "min").item())


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """`src`'s picklable object on every rank."""
    if not active():
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=src, device=group_device())
    return payload[0]


def gather_objects(obj: Any, *, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable object, in rank order, on `dst`; None elsewhere."""
    if not active():
        return [obj]
    everyone: list[Any] | None = [None] * world_size() if rank() == dst else None
    # gather_object takes no device: it uses the current CUDA device under NCCL, which the
    # loop sets to the worker's (see `bind_device`).
    dist.gather_object(obj, everyone, dst=dst)
    return everyone


def bind_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device, the one NCCL and object collectives use."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def in_step(items: Iterable[T], *, lookahead: int) -> Iterator[T]:
    """The items every rank still has, one collective per `lookahead` items.

    Ranks read ahead `lookahead` items and agree on the fewest any rank holds; all yield that
    many, and stop together once a rank ran short. The items past the end on a longer rank
    are dropped, as when ranks stop an epoch together item by item, but without a collective
    (and its host sync) per item.
    """
    items = iter(items)
    while True:
        ahead = list(itertools.islice(items, lookahead))
        agreed = agree_min(len(ahead))
        yield from ahead[:agreed]
        if agreed < lookahead:
            return
