"""The draft layer under tensor parallelism, sharded the way vLLM shards a target decoder layer.

With TP ranks r = 0..T-1 (vLLM's ``QKVParallelLinear`` / ``RowParallelLinear`` split):

* query heads: rank r holds the contiguous block ``[r*Hq/T, (r+1)*Hq/T)`` (self- and cross-attention
  q_proj rows, with their biases);
* KV heads: rank r holds ``[r*Hk/T, (r+1)*Hk/T)`` when ``Hk >= T``, else the single head
  ``r // (T/Hk)`` (vLLM replicates KV heads then). These are exactly the heads of the target's
  last-layer KV cache on that rank, so each rank's cross-attention reads only its own cache
  shard, and its own self-attention K/V (the ring rows shrink by T);
* o_proj (self and cross) and the MLP's down_proj are row-parallel: each rank multiplies its
  columns and the partial outputs are summed with one all-reduce each (before the residual add);
  gate/up are column-parallel over ``[r*I/T, (r+1)*I/T)``; norms are replicated.

The vocabulary-parallel logits head (the target's own ``lm_head`` shard) is
`engine.vocab_head.DraftVocabHead`.

A published (unsharded) checkpoint is loaded by slicing its tensors (`shard_state_dict`).
Communication goes through a `TPComm` (vLLM's TP group in the engine, see
``compat.tp``; a plain ``torch.distributed`` group in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .checkpoint import DraftCheckpoint, DraftCheckpointError, check_state_dict, expected_shapes
from .model import DraftArchitecture, LongSpecDraftLayer


class TPComm(Protocol):
    """The collectives of one tensor-parallel group (every rank calls them in the same order)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; every rank gets the identical result."""

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's `x` along `dim`, in rank order."""

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank (same shape and dtype everywhere)."""


@dataclass(frozen=True)
class HeadShard:
    """Which part of the draft layer one TP rank holds (global indices, contiguous)."""

    rank: int
    world_size: int
    q_heads: range
    kv_heads: range
    intermediate: range

    @classmethod
    def of(cls, arch: DraftArchitecture, rank: int, world_size: int) -> "HeadShard":
        """vLLM's split of a decoder layer with `arch`'s shapes over `world_size` ranks.

        Raises:
            ValueError: when vLLM could not shard a target of these shapes either.
        """
        hq, hk, inter = arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size
        t = world_size
        if not 0 <= rank < t:
            raise ValueError(f"TP rank {rank} outside world size {t}")
        if hq % t or (hk % t and t % hk) or inter % t:
            raise ValueError(
                f"LongSpec draft cannot be split over {t} tensor-parallel ranks: "
                f"{hq} query heads, {hk} KV heads, intermediate size {inter} (query heads and "
                "intermediate size must divide by TP; KV heads must divide or be divided by it)")
        q = hq // t
        if hk >= t:
            kv = range(rank * (hk // t), (rank + 1) * (hk // t))
        else:
            head = rank // (t // hk)
            kv = range(head, head + 1)
        i = inter // t
        return cls(rank=rank, world_size=t, q_heads=range(rank * q, (rank + 1) * q), kv_heads=kv,
                   intermediate=range(rank * i, (rank + 1) * i))

    def local_arch(self, arch: DraftArchitecture) -> DraftArchitecture:
        """The shapes of this rank's layer (hidden size and vocabulary stay global)."""
        return replace(arch, num_attention_heads=len(self.q_heads),
                       num_key_value_heads=len(self.kv_heads),
                       intermediate_size=len(self.intermediate))


def _rows(heads: range, head_dim: int) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


def shard_state_dict(state: dict[str, torch.Tensor], arch: DraftArchitecture,
                     shard: HeadShard) -> dict[str, torch.Tensor]:
    """This rank's slices of a full (published-layout) draft state dict.

    Args:
        state: the unsharded tensors, keys as in `LongSpecDraftLayer` (e.g. ``self_attn.q_proj.weight``
            [Hq*D, hidden], ``mlp.down_proj.weight`` [hidden, I]).
    Returns:
        the same keys with this rank's shapes (q_proj [Hq/T*D, hidden], o_proj [hidden, Hq/T*D],
        k/v_proj [Hk_local*D, hidden], gate/up [I/T, hidden], down [hidden, I/T], norms whole).
    """
    d = arch.head_dim
    q, kv = _rows(shard.q_heads, d), _rows(shard.kv_heads, d)
    inter = slice(shard.intermediate.start, shard.intermediate.stop)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            part = tensor[q]
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            part = tensor[kv]
        elif name.endswith("o_proj.weight"):
            part = tensor[:, q]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            part = tensor[inter]
        elif name.endswith("down_proj.weight"):
            part = tensor[:, inter]
        elif name.endswith("layernorm.weight"):
            part = tensor
        else:
            raise DraftCheckpointError(f"LongSpec draft tensor {name} has no TP sharding rule")
        out[name] = part.contiguous()
    return out


class ShardedDraftLayer(LongSpecDraftLayer):
    """One rank's shard of the draft layer.

    ``forward`` / ``self_kv`` are `LongSpecDraftLayer`'s with this rank's head counts: queries
    [N, Hq/T, D], self K/V [N, Hk_local, D], cross-attention over the rank's own KV heads of the
    target cache; the row-parallel outputs are all-reduced, so the returned hidden states
    [N, hidden] are complete and identical on every rank.
    """

    def __init__(self, arch: DraftArchitecture, shard: HeadShard, comm: TPComm):
        super().__init__(shard.local_arch(arch))
        self.full_arch = arch
        self.shard = shard
        self.comm = comm

    def reduce_partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x)


def build_sharded_draft_layer(ckpt: DraftCheckpoint, comm: TPComm,
                              dtype: torch.dtype = torch.float32,
                              device: torch.device | str = "cpu") -> ShardedDraftLayer:
    """This rank's shard of a published (unsharded) checkpoint, every tensor checked first."""
    check_state_dict(ckpt, expected_shapes(ckpt.arch))
    shard = HeadShard.of(ckpt.arch, comm.rank, comm.world_size)
    layer = ShardedDraftLayer(ckpt.arch, shard, comm)
    layer.load_state_dict(shard_state_dict(ckpt.state_dict, ckpt.arch, shard))
    return layer.to(device=device, dtype=dtype).eval()


class TorchDistComm:
    """`TPComm` over a plain ``torch.distributed`` group (gloo or NCCL), outside vLLM."""

    def __init__(self, group: "torch.distributed.ProcessGroup | None" = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        self._dist.all_reduce(out, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(x, src=self._dist.get_global_rank(self.group, src)
                             if self.group is not None else src, group=self.group)
        return x
