"""The drafter's pieces on one tensor-parallel rank: the draft layer (sharded or whole), the
logits head (vocabulary-parallel or whole) and the ring's per-rank KV-head count.

Without TP this is exactly the single-rank drafter: the unsharded layer and the target's
``compute_logits``. With TP every rank of vLLM's TP group builds its shard from the same
published (unsharded) checkpoint; see `draft.sharding` and `engine.vocab_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..compat import tp as compat_tp
from ..compat import vllm_api
from ..draft.checkpoint import DraftCheckpoint, build_draft_layer
from ..draft.model import LongSpecDraftLayer
from ..draft.sharding import TPComm, build_sharded_draft_layer
from .vocab_head import DraftVocabHead, VocabShard


@dataclass
class DraftOnRank:
    draft: LongSpecDraftLayer   # a ShardedDraftLayer under TP
    head: DraftVocabHead
    num_kv_heads: int           # KV heads of the draft (and of the target cache) on this rank
    comm: TPComm | None         # None without TP
    rank: int = 0
    world_size: int = 1


def build_draft_on_rank(ckpt: DraftCheckpoint, target_model: Any,
                        target: vllm_api.TargetHandles, vllm_config: Any) -> DraftOnRank:
    """This worker's draft, built beside its shard of the target."""
    comm = compat_tp.tp_comm(vllm_config)
    if comm is None:
        draft = build_draft_layer(ckpt, dtype=target.dtype, device=target.device)
        vocab = ckpt.arch.vocab_size
        head = DraftVocabHead(target.compute_logits, VocabShard(0, vocab, vocab))
        return DraftOnRank(draft, head, ckpt.arch.num_key_value_heads, None)
    draft = build_sharded_draft_layer(ckpt, comm, dtype=target.dtype, device=target.device)
    local_logits, shard = compat_tp.vocab_parallel_logits(target_model)
    return DraftOnRank(draft, DraftVocabHead(local_logits, shard, comm),
                       draft.arch.num_key_value_heads, comm, comm.rank, comm.world_size)
