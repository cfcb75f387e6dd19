"""Held-out acceptance of a draft, at the tree root's lag (1).

Per token ``i`` (the draft sees the target's K/V up to ``i - 1``, the target has read ``0..i``):
  * ``accept``: E[accept] = Σ_x min(p_target(x), p_draft(x)) = 1 - TV(p_target, p_draft), the
    probability that one sampled draft token is accepted by speculative sampling;
  * ``top1``: argmax draft == argmax target (greedy acceptance of the first drafted token);
  * ``ce``: the draft's cross-entropy on the data's next token.
Evaluated at plain positions (``short``: 0..S-1) and at ``long`` positions: the first 4 tokens
(the attention sink) at 0..3, every later one shifted by ``long_offset`` (RoPE is relative: a
uniform shift would measure nothing). That is where anchor-offset training should help.
Those "long" sequences are still short (S tokens): the evaluation over real long prefixes,
where the draft cross-attends over tens of thousands of target tokens, is ``long_eval.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .forward import draft_forward
from .loss import IGNORE_INDEX, LOSS_CHUNK, next_token_labels
from .positions import plain_positions, shifted_positions
from .target_kv import FrozenTarget

ROOT_LAG = 1


@dataclass
class TokenMetrics:
    """Per-token acceptance metrics of N evaluated tokens (CPU tensors).

    accept: [N] fp32, Σ_x min(p_target(x), p_draft(x)); top1: [N] bool, argmax agreement;
    ce: [N] fp32, the draft's cross-entropy on the next token (0 where it has none);
    labeled: [N] bool, the token has a next token (counts in ``ce``).
    """

    accept: torch.Tensor
    top1: torch.Tensor
    ce: torch.Tensor
    labeled: torch.Tensor


@torch.no_grad()
def token_metrics(draft_hidden: torch.Tensor, target_hidden: torch.Tensor, labels: torch.Tensor,
                  lm_head: nn.Module, chunk: int = LOSS_CHUNK) -> TokenMetrics:
    """Per-token metrics from the final hidden states of the draft and of the target.

    Args:
        draft_hidden, target_hidden: [N, hidden] for the same N tokens (the target's at token
            ``i`` is its next-token distribution after reading ``0..i``).
        labels: [N] the data's next tokens, IGNORE_INDEX where there is none.
        lm_head: the target's output layer; logits are formed `chunk` tokens at a time.
    """
    parts: dict[str, list[torch.Tensor]] = {"accept": [], "top1": [], "ce": []}
    for c0 in range(0, draft_hidden.shape[0], chunk):
        c1 = min(c0 + chunk, draft_hidden.shape[0])
        d_logits = lm_head(draft_hidden[c0:c1]).float()
        t_logits = lm_head(target_hidden[c0:c1]).float()
        p_d, p_t = d_logits.softmax(-1), t_logits.softmax(-1)
        parts["accept"].append(torch.minimum(p_d, p_t).sum(-1).cpu())
        parts["top1"].append((d_logits.argmax(-1) == t_logits.argmax(-1)).cpu())
        parts["ce"].append(F.cross_entropy(d_logits, labels[c0:c1], ignore_index=IGNORE_INDEX,
                                           reduction="none").cpu())
    return TokenMetrics(accept=_cat(parts["accept"], torch.float32),
                        top1=_cat(parts["top1"], torch.bool),
                        ce=_cat(parts["ce"], torch.float32),
                        labeled=(labels != IGNORE_INDEX).cpu())


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def summarize(metrics: Sequence[TokenMetrics]) -> dict[str, float]:
    """{"accept", "top1", "ce", "tokens"}: means over all tokens of `metrics` (ce over the
    labeled ones); NaN when there are none."""
    tokens = sum(m.accept.numel() for m in metrics)
    labeled = sum(int(m.labeled.sum()) for m in metrics)
    sums = {name: sum(float(getattr(m, name).double().sum()) for m in metrics)
            for name in ("accept", "top1", "ce")}
    nan = float("nan")
    return {"accept": sums["accept"] / tokens if tokens else nan,
            "top1": sums["top1"] / tokens if tokens else nan,
            "ce": sums["ce"] / labeled if labeled else nan,
            "tokens": tokens}


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
    parts: list[TokenMetrics] = []
    try:
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size].to(device)
            b, s = ids.shape
            positions = (shifted_positions(b, s, position_offset, device=device)
                         if position_offset else plain_positions(b, s, device=device))
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = draft_forward(draft, target, ids, positions, window=window, lag=ROOT_LAG)
                target_hidden = out.target.hidden.reshape(out.hidden.shape[0], -1)
                parts.append(token_metrics(out.hidden, target_hidden,
                                           next_token_labels(ids).reshape(-1), target.lm_head,
                                           chunk))
    finally:
        draft.train(was_training)
    return summarize(parts)


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
