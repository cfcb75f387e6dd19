"""One training/evaluation forward: frozen target, then the draft at a given cross lag."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import make_cross_attend, make_self_attend
from .target_kv import FrozenTarget, TargetBatch


@dataclass
class DraftBatchOutput:
    """hidden: [B * S, hidden] draft outputs (feed to the target's lm_head);
    target: the target's K/V and final hidden states for the same tokens."""

    hidden: torch.Tensor
    target: TargetBatch


def draft_forward(draft: nn.Module, target: FrozenTarget, input_ids: torch.Tensor,
                  positions: torch.Tensor, *, window: int, lag: int) -> DraftBatchOutput:
    """Runs the target (no grad) and the draft (with grad when enabled) over a batch.

    Args:
        draft: a ``LongSpecDraftLayer`` (possibly wrapped in DDP).
        input_ids, positions: [B, S]; the same positions feed the target and the draft.
        window: draft self-attention window (keys per query, itself included).
        lag: the cross-attention lag (1 = tree root at serving time).
    """
    batch, seq_len = input_ids.shape
    embeds = target.embed(input_ids)
    tgt = target(input_ids, positions, inputs_embeds=embeds)
    # The residual stream of the draft stays fp32 (embeddings may be bf16); autocast, when on,
    # runs the projections and attention in bf16.
    hidden = draft(embeds.reshape(batch * seq_len, -1).float(), positions.reshape(-1),
                   target.rope, make_self_attend(batch, seq_len, window),
                   make_cross_attend(tgt.k, tgt.v, lag))
    return DraftBatchOutput(hidden=hidden, target=tgt)
