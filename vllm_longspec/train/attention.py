"""The draft's two attentions over dense training sequences.

Both work in sequence-index space (positions only enter through RoPE, applied by the caller):

  * self-attention: query ``i`` sees the draft keys ``j`` with ``i - window < j <= i`` -- the
    last ``window`` tokens including itself, like the serving ring buffer of ``window`` slots;
  * cross-attention: query ``i`` sees the target's last-layer K/V ``j <= i - lag``. At serving
    time the root of a draft tree at index ``i`` sees the target's K/V up to ``i - 1`` and a
    node of depth ``d`` up to ``i - 1 - d``, so ``lag = 1`` is the root and the trainer draws
    ``lag`` in ``1..max_lag`` per step. Queries with nothing visible (``i < lag``) get zeros.

Memory stays linear in the sequence length: the cross-attention is a plain causal attention
of the queries ``[lag:]`` over the keys ``[:-lag]`` (so SDPA can use its flash / memory-efficient
causal kernels, no mask), and the self-attention runs over query chunks, each against the band
of keys it can see, with a small boolean mask.

GQA: K/V are repeated to the query heads (``enable_gqa`` would restrict SDPA to its flash and
math kernels on some versions; the copy is small next to the activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..draft.model import CrossAttendFn, SelfAttendFn

# Queries per self-attention chunk (at least `window`): each chunk sees < chunk + window keys.
SELF_ATTENTION_CHUNK = 1024


def sliding_window_mask(seq_len: int, window: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """[seq_len, seq_len] bool, True where query i may see key j: ``i - window < j <= i``."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def lagged_causal_mask(seq_len: int, lag: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[seq_len, seq_len] bool, True where draft query i may see target key j: ``j <= i - lag``."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return j <= i - lag


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, Hk, D] -> [B, heads, S, D], repeating KV heads for GQA."""
    x = x.transpose(1, 2)
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def windowed_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                            chunk: int = SELF_ATTENTION_CHUNK) -> torch.Tensor:
    """Causal sliding-window attention.

    Args:
        q: [B, S, Hq, D] rotated queries; k, v: [B, S, Hk, D] (k rotated).
        window: keys per query, the query itself included (``window >= 1``).
    Returns:
        [B, S, Hq, D].
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    b, s, hq, d = q.shape
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    qh, kh, vh = q.transpose(1, 2), _heads_first(k, hq), _heads_first(v, hq)
    if window >= s:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        return out.transpose(1, 2)
    chunk = max(chunk, window)
    outs = []
    for q0 in range(0, s, chunk):
        q1 = min(q0 + chunk, s)
        k0 = max(0, q0 - window + 1)
        i = torch.arange(q0, q1, device=q.device)[:, None]
        j = torch.arange(k0, q1, device=q.device)[None, :]
        mask = (j <= i) & (j > i - window)
        outs.append(F.scaled_dot_product_attention(qh[:, :, q0:q1], kh[:, :, k0:q1],
                                                   vh[:, :, k0:q1], attn_mask=mask))
    return torch.cat(outs, dim=2).transpose(1, 2)


def lagged_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           lag: int) -> torch.Tensor:
    """Attention of draft queries over the target's K/V, lagging by `lag` tokens.

    Args:
        q: [B, S, Hq, D] rotated draft queries.
        k, v: [B, S, Hk, D] the target's last-layer K (post-RoPE) and V for the same tokens.
        lag: query i sees keys ``0 .. i - lag`` (``lag >= 1``).
    Returns:
        [B, S, Hq, D]; rows ``i < lag`` are zeros.
    """
    if lag < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    b, s, hq, d = q.shape
    if lag >= s:
        return q * 0  # zeros that keep q in the graph (DDP expects every parameter to get a grad)
    # Query row r (= index r + lag) over key column c: causal (top-left) <=> c <= r = i - lag.
    qh = q[:, lag:].transpose(1, 2)
    kh = _heads_first(k[:, : s - lag].to(q.dtype), hq)
    vh = _heads_first(v[:, : s - lag].to(q.dtype), hq)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
    return F.pad(out, (0, 0, 0, 0, lag, 0))


def make_self_attend(batch: int, seq_len: int, window: int) -> SelfAttendFn:
    """The ``self_attend`` callable for ``LongSpecDraftLayer.forward`` over flattened
    ``[batch * seq_len]`` tokens (row-major: sequence, then index)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = windowed_self_attention(q.view(batch, seq_len, *q.shape[1:]),
                                      k.view(batch, seq_len, *k.shape[1:]),
                                      v.view(batch, seq_len, *v.shape[1:]), window)
        return out.reshape(batch * seq_len, *q.shape[1:])

    return attend


def make_cross_attend(target_k: torch.Tensor, target_v: torch.Tensor, lag: int) -> CrossAttendFn:
    """The ``cross_attend`` callable over the target's K/V ``[B, S, Hk, D]`` (see
    :func:`lagged_cross_attention`) for flattened ``[B * S]`` draft queries."""
    batch, seq_len = target_k.shape[:2]

    def attend(q: torch.Tensor) -> torch.Tensor:
        out = lagged_cross_attention(q.view(batch, seq_len, *q.shape[1:]), target_k, target_v, lag)
        return out.reshape(batch * seq_len, *q.shape[1:])

    return attend
