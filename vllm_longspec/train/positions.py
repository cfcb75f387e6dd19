"""Anchor-offset position indices (LongSpec paper, sec. "Anchor-Offset Indices").

Short training sequences would only ever show the draft small RoPE positions, while serving
happens at positions in the tens of thousands. Anchor-offset keeps the first ``s`` tokens
(``s`` in 0..4, the "attention sink" anchors) at positions ``0..s-1`` and shifts every later
token by a random offset, so short data exercises large relative and absolute positions:

    s = 3, offset = 20000  ->  0 1 2 | 20003 20004 20005 ...

As in the reference trainer (``longspec/train/models/*_glide.py``):
  * sequences longer than the threshold (default 1200 tokens) keep plain positions;
  * ``offset`` is uniform in ``[0, max(min(30000, max_len - 1000) - seq_len, 0)]`` (inclusive);
  * the same positions go to the frozen target (whose last-layer K/V the draft reads) and to the
    draft.
Unlike the reference (one draw per batch), every sequence of a batch draws its own ``s`` and
offset: more position diversity per step, same distribution.
"""

from __future__ import annotations

import random

import torch

MAX_ANCHORS = 4        # s is drawn in 0..MAX_ANCHORS (inclusive)
OFFSET_CAP = 30000     # the largest shifted start, as in the reference
MAX_LEN_MARGIN = 1000  # the reference keeps positions 1000 below model_max_length
DEFAULT_THRESHOLD = 1200


def plain_positions(batch: int, seq_len: int, offset: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, seq_len] positions ``offset + 0 .. offset + seq_len - 1``."""
    return (torch.arange(seq_len, device=device) + offset).expand(batch, seq_len).contiguous()


def shifted_positions(batch: int, seq_len: int, offset: int, anchors: int = MAX_ANCHORS,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch, seq_len] positions with the first `anchors` tokens at ``0..anchors-1`` and the rest
    shifted by `offset`: ``0 1 2 3 | offset+4 offset+5 ...`` (the held-out "long" evaluation).

    RoPE is relative, so shifting every position alike would change nothing; keeping the sink
    tokens in place puts the other tokens ``offset`` positions away from them, as in a long
    prompt."""
    positions = plain_positions(batch, seq_len, device=device)
    positions[:, anchors:] += offset
    return positions


def max_offset(seq_len: int, max_len: int) -> int:
    """The largest anchor offset for a sequence of `seq_len` tokens on a target whose longest
    supported position is `max_len` (inclusive bound)."""
    return max(min(OFFSET_CAP, max_len - MAX_LEN_MARGIN) - seq_len, 0)


def anchor_offset_positions(batch: int, seq_len: int, *, max_len: int, rng: random.Random,
                            enabled: bool = True, threshold: int = DEFAULT_THRESHOLD,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """Training positions for a batch of packed sequences.

    Args:
        batch, seq_len: the batch shape.
        max_len: the target's longest position (``max_position_embeddings``).
        rng: the source of ``s`` and the offset (seeded per step by the caller, so a resumed run
            draws the same positions).
        enabled: False gives plain positions (the ablation ``--no-anchor-offset``).
        threshold: sequences longer than this keep plain positions.
    Returns:
        [batch, seq_len] int64 positions.
    """
    positions = plain_positions(batch, seq_len, device=device)
    if not enabled or seq_len > threshold:
        return positions
    high = max_offset(seq_len, max_len)
    shifts = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        anchors = rng.randint(0, MAX_ANCHORS)
        offset = rng.randint(0, high)
        shifts[row, anchors:] = offset
    return positions + shifts.to(device)
