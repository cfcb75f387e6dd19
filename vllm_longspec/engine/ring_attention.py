"""The draft's self-attention at serving time: its ring through FlashAttention, plus this step's
speculative nodes, merged exactly.

A query of tree level l sees (a) its request's ring -- the K/V of the last `window` committed
tokens -- and (b) the K/V of its speculative ancestors in this step and its own (the "scratch",
at most a few dozen nodes, visible per the tree). The ring of every request is one page of
`window` slots, so (a) is FlashAttention over a paged cache whose block table is the request's
ring row and whose length is the row's fill (slots ``[0, fill)`` are the filled ones; the
order of keys inside the page does not matter to attention). (b) is a small masked attention
in torch; the two are combined by treating (a) as one extra key per head whose logit is its
log-sum-exp and whose value is its output, which is exactly the softmax over the union.

On the CPU (a) runs `vllm_longspec_kernels`' torch path; `draft_attention.grouped_ring_self_attention`
is the plain reference both are tested against.
"""

from __future__ import annotations

import torch

from vllm_longspec_kernels import attend_paged_prefix


def ring_attention(q: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                   rows: torch.Tensor, ring_valid: torch.Tensor,
                   scratch_k: torch.Tensor | None, scratch_v: torch.Tensor | None,
                   scale: float, visible: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of n queries per request over its ring (+ scratch nodes).

    Args:
        q: [B, n, Hq, D] rotated queries, request-major.
        ring_k, ring_v: [R, W, Hk, D] the ring buffers (one page of W slots per row).
        rows: [B] int64 ring row of each request.
        ring_valid: [B] filled slots of that row (>= 1: a query must see something).
        scratch_k, scratch_v: [B, S, Hk, D] K/V of the request's speculative nodes, or None.
        scale: softmax scale.
        visible: [B, n, S] bool, which scratch nodes each query sees; None = all.
        cu_seqlens: [B+1] int32 ``arange(B + 1) * n`` when the caller has it (drafting reuses
            it across levels and attentions); built here otherwise.
    Returns:
        [B, n, Hq, D] in q's dtype.
    """
    batch, n, hq, d = q.shape
    window, hk = ring_k.shape[1], ring_k.shape[2]
    cu = cu_seqlens if cu_seqlens is not None else \
        torch.arange(batch + 1, dtype=torch.int32, device=q.device) * n
    backend = "auto" if q.is_cuda else "torch"
    out, lse = attend_paged_prefix(
        q.reshape(batch * n, hq, d).contiguous(), ring_k, ring_v,
        rows.to(torch.int32).unsqueeze(1), ring_valid.to(torch.int32), cu, scale,
        max_seqlen_q=n, max_prefix_len=window, backend=backend)
    if scratch_k is None or scratch_k.shape[1] == 0:
        return out.reshape(batch, n, hq, d).to(q.dtype)
    group = hq // hk
    # The ring as one pseudo-key per (query, head): logit = its LSE, value = its output.
    ring_out = out.reshape(batch, n, hk, group, d).float()
    ring_lse = lse.transpose(0, 1).reshape(batch, n, hk, group, 1).float()
    qf = q.reshape(batch, n, hk, group, d).float()
    logits = torch.einsum("bnhgd,bshd->bnhgs", qf, scratch_k.float()) * scale
    if visible is not None:
        logits = torch.where(visible[:, :, None, None, :], logits, float("-inf"))
    probs = torch.softmax(torch.cat([ring_lse, logits], dim=-1), dim=-1)
    mixed = probs[..., :1] * ring_out + torch.einsum("bnhgs,bshd->bnhgd", probs[..., 1:],
                                                     scratch_v.float())
    return mixed.reshape(batch, n, hq, d).to(q.dtype)
