"""Training losses through the target's (shared, frozen) lm_head, chunked over tokens.

With a 150k-token vocabulary the logits of a 16k-token sequence alone are ~10 GB in fp32, so the
lm_head and the loss run over token chunks, and each chunk is recomputed in the backward pass
(activation checkpointing) instead of keeping its logits alive: peak memory is one chunk's
logits, whatever the batch.

  * ``ce``: cross-entropy of the draft on the data's next token;
  * ``distill``: KL(p_target || p_draft) on the target's next-token distribution (temperature 1;
    same gradient as the cross-entropy to the soft labels, but 0 at a perfect match).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LossKind = Literal["ce", "distill"]
IGNORE_INDEX = -100
LOSS_CHUNK = 2048  # tokens per lm_head chunk: 2048 x 152k fp32 logits = 1.2 GB


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> [B, S] labels: ``ids[:, i + 1]``, IGNORE_INDEX at the last index."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_kl(hidden: torch.Tensor, target_hidden: torch.Tensor,
              lm_head: nn.Module) -> torch.Tensor:
    draft_logp = F.log_softmax(lm_head(hidden).float(), dim=-1)
    with torch.no_grad():
        target_logp = F.log_softmax(lm_head(target_hidden).float(), dim=-1)
    return F.kl_div(draft_logp, target_logp, log_target=True, reduction="sum")


def lm_loss(hidden: torch.Tensor, lm_head: nn.Module, kind: LossKind, *,
            labels: torch.Tensor | None = None, target_hidden: torch.Tensor | None = None,
            chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, int]:
    """Summed loss of the draft's hidden states and the number of tokens it covers.

    Args:
        hidden: [N, hidden] draft outputs (flattened batch).
        lm_head: the target's output layer (frozen; its weight gets no gradient).
        kind: "ce" (needs `labels` [N], IGNORE_INDEX to skip) or "distill" (needs
            `target_hidden` [N, hidden], the target's final hidden states for the same tokens).
    Returns:
        (loss_sum: fp32 scalar with grad, count: tokens in the sum). Divide for the mean.
    """
    if kind == "ce" and labels is None:
        raise ValueError("the ce loss needs labels")
    if kind == "distill" and target_hidden is None:
        raise ValueError("the distill loss needs the target's hidden states")
    total = hidden.new_zeros((), dtype=torch.float32)
    count = 0
    use_checkpoint = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        if kind == "ce":
            part_labels = labels[start:end]
            n = int((part_labels != IGNORE_INDEX).sum())
            if n == 0:
                continue
            args = (hidden[start:end], part_labels, lm_head)
            fn = _chunk_ce
        else:
            n = end - start
            args = (hidden[start:end], target_hidden[start:end], lm_head)
            fn = _chunk_kl
        part = checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args)
        total = total + part
        count += n
    return total, count
