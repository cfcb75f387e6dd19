"""Process-group plumbing: one process, or many started by ``torchrun`` (DDP on the draft,
optionally FSDP on the frozen target). NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int) -> torch.device:
    """"auto" -> this rank's GPU when there is one, else CPU; "cuda" -> cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise TrainError(f"--device {spec!r}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {spec}: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device_spec: str = "auto") -> DistInfo:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            try:  # binding the device avoids NCCL's guess (and its warning) on newer torch
                dist.init_process_group("nccl", device_id=device)
            except TypeError:  # torch < 2.3
                dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    owns_group=owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_across_ranks(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's parameters (names, dtypes and bytes): equal iff identical."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(p.dtype).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wrap_draft_ddp(draft: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return draft
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(draft, device_ids=device_ids)


def shard_target_fsdp(base: nn.Module, info: DistInfo) -> None:
    """Shards the target's decoder layers over the ranks (FSDP2 ``fully_shard``, one unit per
    layer, in place) for targets too large for one GPU. Everything else (embedding, final norm,
    rotary, lm_head) stays whole on every rank: it is used outside the decoder's forward.
    Every rank must then run the same number of target forwards (they do: the same micro-batch
    count per step, and every rank evaluates the whole held-out set)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in base.layers:
        fully_shard(layer, mesh=mesh)
