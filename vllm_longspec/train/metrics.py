"""Held-out acceptance of a draft, at the tree root's lag (1).

Per token ``i`` (the draft sees the target's K/V up to ``i - 1``, the target has read ``0..i``):
  * ``accept``: E[accept] = Σ_x min(p_target(x), p_draft(x)) = 1 - TV(p_target, p_draft), the
    probability that one sampled draft token is accepted by speculative sampling;
  * ``top1``: argmax draft == argmax target (greedy acceptance of the first drafted token);
  * ``ce``: the draft's cross-entropy on the data's next token.
Evaluated at plain positions (``short``: 0..S-1) and at ``long`` positions: the first 4 tokens
(the attention sink) at 0..3, every later one shifted by ``long_offset`` (RoPE is relative: a
uniform shift would measure nothing). That is where anchor-offset training should help.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .forward import draft_forward
from .loss import IGNORE_INDEX, LOSS_CHUNK, next_token_labels
from .positions import plain_positions, shifted_positions
from .target_kv import FrozenTarget

ROOT_LAG = 1


@torch.no_grad()
def evaluate(draft: nn.Module, target: FrozenTarget, sequences: torch.Tensor, *, window: int,
             batch_size: int, position_offset: int = 0,
             autocast: Callable[[], object] | None = None,
             chunk: int = LOSS_CHUNK) -> dict[str, float]:
    """Acceptance metrics of `draft` on held-out `sequences` [n, S] (token ids, CPU or device),
    at plain positions, or at :func:`shifted_positions` when `position_offset` > 0.

    Returns:
        {"accept", "top1", "ce", "tokens"}: means over all tokens (ce over those with a next
        token); empty input gives NaNs.
    """
    device = target.lm_head.weight.device
    was_training = draft.training
    draft.eval()
    sums = {"accept": 0.0, "top1": 0.0, "ce": 0.0}
    tokens = ce_tokens = 0
    try:
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size].to(device)
            b, s = ids.shape
            positions = (shifted_positions(b, s, position_offset, device=device)
                         if position_offset else plain_positions(b, s, device=device))
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = draft_forward(draft, target, ids, positions, window=window, lag=ROOT_LAG)
                labels = next_token_labels(ids).reshape(-1)
                target_hidden = out.target.hidden.reshape(out.hidden.shape[0], -1)
                for c0 in range(0, out.hidden.shape[0], chunk):
                    c1 = min(c0 + chunk, out.hidden.shape[0])
                    d_logits = target.lm_head(out.hidden[c0:c1]).float()
                    t_logits = target.lm_head(target_hidden[c0:c1]).float()
                    p_d, p_t = d_logits.softmax(-1), t_logits.softmax(-1)
                    sums["accept"] += torch.minimum(p_d, p_t).sum().item()
                    sums["top1"] += (d_logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
                    part = labels[c0:c1]
                    sums["ce"] += F.cross_entropy(d_logits, part, ignore_index=IGNORE_INDEX,
                                                  reduction="sum").item()
                    ce_tokens += int((part != IGNORE_INDEX).sum())
                    tokens += c1 - c0
    finally:
        draft.train(was_training)
    nan = float("nan")
    return {"accept": sums["accept"] / tokens if tokens else nan,
            "top1": sums["top1"] / tokens if tokens else nan,
            "ce": sums["ce"] / ce_tokens if ce_tokens else nan,
            "tokens": tokens}


def evaluate_short_long(draft: nn.Module, target: FrozenTarget, sequences: torch.Tensor, *,
                        window: int, batch_size: int, long_offset: int,
                        autocast: Callable[[], object] | None = None
                        ) -> dict[str, dict[str, float]]:
    """{"short": metrics at plain positions, "long": metrics with the non-sink tokens shifted by
    `long_offset`} (``long`` is omitted when ``long_offset`` is 0)."""
    result = {"short": evaluate(draft, target, sequences, window=window, batch_size=batch_size,
                                autocast=autocast)}
    if long_offset > 0:
        result["long"] = evaluate(draft, target, sequences, window=window,
                                  batch_size=batch_size, position_offset=long_offset,
                                  autocast=autocast)
    return result
