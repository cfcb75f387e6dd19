"""The draft's two attentions at serving time, in plain torch (the reference path; CPU and GPU).

* Self-attention: a query sees its request's ring (the committed tokens of the window) plus
  "extra" keys: the K/V of its speculative ancestors in this step and its own.
* Cross-attention (not here): a query sees the target's last-layer K/V of its request's committed
  prefix, read in place from vLLM's paged cache through the block table by
  ``vllm_longspec_kernels.attend_paged_prefix`` (FlashAttention on the GPU, torch on the CPU).

All math in fp32; outputs in the query dtype.
"""

from __future__ import annotations

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched softmax attention with GQA.

    Args:
        q: [..., n, Hq, D]; k, v: [..., m, Hk, D] with Hq a multiple of Hk.
        mask: [..., n, m] bool (True = visible) or None.
    Returns:
        out [..., n, Hq, D] fp32 (zeros where a query sees nothing) and
        lse [..., n, Hq] fp32 (-inf where a query sees nothing).
    """
    group = q.shape[-2] // k.shape[-2]
    kf = k.float().repeat_interleave(group, dim=-2)
    vf = v.float().repeat_interleave(group, dim=-2)
    scores = torch.einsum("...nhd,...mhd->...hnm", q.float(), kf) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(-3), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [..., h, n]
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("...hnm,...mhd->...nhd", probs, vf)
    return out, lse.transpose(-1, -2)


def ring_self_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                        query_rows: torch.Tensor, ring_valid: torch.Tensor,
                        extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
                        scale: float, extra_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Draft self-attention of N queries.

    Args:
        q: [N, Hq, D] rotated queries.
        ring_k, ring_v: [R, W, Hk, D] the ring buffers.
        query_rows: [N] ring row of each query's request.
        ring_valid: [N] number of filled slots of that row (slots >= it are empty).
        extra_k, extra_v: [N, E, Hk, D] K/V of speculative tokens of the query's request,
            or None when the query is a committed token already in its ring (E = 0).
        extra_mask: [N, E] bool, which extra keys the query sees (its tree ancestors and
            itself); None = all.
    Returns:
        [N, Hq, D] in q's dtype.
    """
    window = ring_k.shape[1]
    keys = ring_k[query_rows]  # [N, W, Hk, D]
    values = ring_v[query_rows]
    mask = torch.arange(window, device=q.device)[None, :] < ring_valid[:, None]
    if extra_k is not None and extra_k.shape[1] > 0:
        keys = torch.cat([keys, extra_k.to(keys.dtype)], dim=1)
        values = torch.cat([values, extra_v.to(values.dtype)], dim=1)
        if extra_mask is None:
            extra_mask = torch.ones(extra_k.shape[:2], dtype=torch.bool, device=q.device)
        mask = torch.cat([mask, extra_mask], dim=1)
    out, _ = attend(q.unsqueeze(1), keys, values, scale, mask.unsqueeze(1))
    return out.squeeze(1).to(q.dtype)


def grouped_ring_self_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                                request_rows: torch.Tensor, ring_valid: torch.Tensor,
                                extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
                                scale: float, extra_mask: torch.Tensor | None = None
                                ) -> torch.Tensor:
    """Draft self-attention of n queries per request (a tree level), keys shared per request.

    Same result as `ring_self_attention` on the flattened queries, but each request's ring row
    is read once for all its queries and GQA groups are broadcast, not copied (the per-query
    gather and ``repeat_interleave`` cost more memory traffic than the whole draft layer).

    Args:
        q: [B, n, Hq, D] rotated queries, request-major.
        ring_k, ring_v: [R, W, Hk, D] the ring buffers.
        request_rows: [B] ring row of each request.
        ring_valid: [B] filled slots of that row.
        extra_k, extra_v: [B, S, Hk, D] K/V of the request's speculative nodes (or None).
        extra_mask: [B, n, S] bool, which extra keys each query sees; None = all.
    Returns:
        [B, n, Hq, D] in q's dtype.
    """
    batch, n, hq, d = q.shape
    window, hk = ring_k.shape[1], ring_k.shape[2]
    keys, values = ring_k[request_rows], ring_v[request_rows]  # [B, W, Hk, D]
    mask = (torch.arange(window, device=q.device)[None, :] < ring_valid[:, None])
    mask = mask[:, None, :].expand(batch, n, window)
    if extra_k is not None and extra_k.shape[1] > 0:
        keys = torch.cat([keys, extra_k.to(keys.dtype)], dim=1)
        values = torch.cat([values, extra_v.to(values.dtype)], dim=1)
        if extra_mask is None:
            extra_mask = torch.ones(batch, n, extra_k.shape[1], dtype=torch.bool,
                                    device=q.device)
        mask = torch.cat([mask, extra_mask], dim=2)
    qf = q.float().view(batch, n, hk, hq // hk, d)
    scores = torch.einsum("bnhgd,bmhd->bhgnm", qf, keys.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # a query seeing nothing
    out = torch.einsum("bhgnm,bmhd->bnhgd", probs, values.float())
    return out.reshape(batch, n, hq, d).to(q.dtype)
