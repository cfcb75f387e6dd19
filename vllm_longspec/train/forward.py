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


def run_draft(draft: nn.Module, target: FrozenTarget, embeds: torch.Tensor,
              positions: torch.Tensor, target_k: torch.Tensor, target_v: torch.Tensor, *,
              window: int, lag: int) -> torch.Tensor:
    """The draft over a batch whose target K/V are already computed.

    Args:
        draft: a ``LongSpecDraftLayer`` (possibly wrapped in DDP).
        embeds: [B, S, hidden] the target's embeddings of the tokens.
        positions: [B, S] the positions the target ran at.
        target_k, target_v: [B, S, Hk, D] the target's last-layer K (post-RoPE) and V.
        window: draft self-attention window (keys per query, itself included).
        lag: the cross-attention lag (1 = tree root at serving time).
    Returns:
        [B * S, hidden] the draft's final hidden states.
    """
    batch, seq_len = embeds.shape[:2]
    # The residual stream of the draft stays fp32 (embeddings may be bf16); autocast, when on,
    # runs the projections and attention in bf16.
    return draft(embeds.reshape(batch * seq_len, -1).float(), positions.reshape(-1),
                 target.rope, make_self_attend(batch, seq_len, window),
                 make_cross_attend(target_k, target_v, lag))


def draft_forward(draft: nn.Module, target: FrozenTarget, input_ids: torch.Tensor,
                  positions: torch.Tensor, *, window: int, lag: int) -> DraftBatchOutput:
    """Runs the target (no grad) and the draft (with grad when enabled) over a batch.

    Args:
        draft: a ``LongSpecDraftLayer`` (possibly wrapped in DDP).
        input_ids, positions: [B, S]; the same positions feed the target and the draft.
        window: draft self-attention window (keys per query, itself included).
        lag: the cross-attention lag (1 = tree root at serving time).
    """
    embeds = target.embed(input_ids)
    tgt = target(input_ids, positions, inputs_embeds=embeds)
    hidden = run_draft(draft, target, embeds, positions, tgt.k, tgt.v, window=window, lag=lag)
    return DraftBatchOutput(hidden=hidden, target=tgt)
