"""Exact merge of two partial attentions of the same queries over disjoint key sets.

Given ``(o_a, lse_a)`` over keys A and ``(o_b, lse_b)`` over keys B (natural-log LSE of the scaled
scores), attention over A ∪ B is::

    m   = max(lse_a, lse_b)
    w_a = exp(lse_a - m),  w_b = exp(lse_b - m)
    o   = (w_a * o_a + w_b * o_b) / (w_a + w_b)
    lse = m + log(w_a + w_b)

Empty sides: an LSE of ``-inf`` (or ``+inf``, which FlashAttention-2 reports for a row with no
keys) gives that side weight 0 and its output row is never read, so an uninitialised output of an
empty partial cannot leak NaN into the result. Both sides empty -> output 0, lse -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tree_attention import is_triton_interpret

__all__ = ["merge_attn_states", "merge_attn_states_ref"]

# Elements of one [rows x head_dim] tile: 4 KiB of fp32 per operand keeps registers modest.
_TILE_ELEMS = 4096


@triton.jit
def _merge_kernel(
    out_ptr, out_lse_ptr, a_ptr, a_lse_ptr, b_ptr, b_lse_ptr,
    stride_ot, stride_oh, stride_olh, stride_olt,
    stride_at, stride_ah, stride_alh, stride_alt,
    stride_bt, stride_bh, stride_blh, stride_blt,
    num_rows, num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    # One tile = BLOCK_R (token, head) rows x head_dim.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < num_rows
    tok = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    lse_a = tl.load(a_lse_ptr + head * stride_alh + tok * stride_alt, mask=r_ok,
                    other=float("-inf"))
    lse_b = tl.load(b_lse_ptr + head * stride_blh + tok * stride_blt, mask=r_ok,
                    other=float("-inf"))
    lse_a = tl.where(lse_a == float("inf"), float("-inf"), lse_a)
    lse_b = tl.where(lse_b == float("inf"), float("-inf"), lse_b)
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    total = w_a + w_b
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)

    o_a = tl.load(a_ptr + tok[:, None] * stride_at + head[:, None] * stride_ah + offs_d[None, :],
                  mask=(r_ok & (w_a != 0.0))[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    o_b = tl.load(b_ptr + tok[:, None] * stride_bt + head[:, None] * stride_bh + offs_d[None, :],
                  mask=(r_ok & (w_b != 0.0))[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    o = (o_a * (w_a / total_safe)[:, None]) + (o_b * (w_b / total_safe)[:, None])
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), m_safe + tl.log(total_safe))
        tl.store(out_lse_ptr + head * stride_olh + tok * stride_olt, lse, mask=r_ok)


def merge_attn_states(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merges two partial attentions by their LSEs (Triton; falls back to torch on CPU unless
    ``TRITON_INTERPRET=1``). Argument names follow vLLM's ``merge_attn_states``.

    Arguments:
        prefix_out: (num_tokens, num_heads, head_dim), fp16/bf16/fp32, last dim contiguous.
            Partial attention over the first key set (e.g. the committed prefix).
        prefix_lse: (num_heads, num_tokens), fp32 (any float dtype is upcast), natural log.
            ``-inf`` / ``+inf`` mark rows with no keys (weight 0; the output row is not read).
        suffix_out: (num_tokens, num_heads, head_dim), any float dtype. Partial attention over the
            second key set (e.g. the tree).
        suffix_lse: (num_heads, num_tokens), same conventions as ``prefix_lse``.
        out: optional (num_tokens, num_heads, head_dim) output buffer (any float dtype, may alias
            neither input). Default: a new tensor of ``suffix_out``'s dtype.
        out_lse: optional (num_heads, num_tokens) fp32 buffer for the merged LSE.
        return_lse: compute and return the merged LSE.

    Return:
        out: (num_tokens, num_heads, head_dim), the exact attention over both key sets.
        lse: (num_heads, num_tokens) fp32 merged LSE (``-inf`` where both sides are empty), or
            None when ``return_lse`` is False.
    """
    tokens, heads, head_dim = suffix_out.shape
    if prefix_out.shape != suffix_out.shape:
        raise ValueError(f"prefix_out {tuple(prefix_out.shape)} != suffix_out "
                         f"{tuple(suffix_out.shape)}")
    if prefix_lse.shape != (heads, tokens) or suffix_lse.shape != (heads, tokens):
        raise ValueError("LSEs must be (num_heads, num_tokens)")
    if out is None:
        out = torch.empty_like(suffix_out)
    if return_lse and out_lse is None:
        out_lse = torch.empty(heads, tokens, dtype=torch.float32, device=suffix_out.device)
    if not (suffix_out.is_cuda or is_triton_interpret()):
        o, lse = merge_attn_states_ref(prefix_out, prefix_lse, suffix_out, suffix_lse,
                                       compute_dtype=torch.float32)
        out.copy_(o)
        if return_lse:
            out_lse.copy_(lse)
        return out, out_lse if return_lse else None
    for name, x in (("prefix_out", prefix_out), ("suffix_out", suffix_out), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if tokens == 0 or heads == 0:
        return out, out_lse
    prefix_lse = prefix_lse.float()
    suffix_lse = suffix_lse.float()
    lse_arg = out_lse if return_lse else prefix_lse  # placeholder when not written
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = max(1, _TILE_ELEMS // block_d)
    rows = tokens * heads
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        out, lse_arg, prefix_out, prefix_lse, suffix_out, suffix_lse,
        out.stride(0), out.stride(1), lse_arg.stride(0), lse_arg.stride(1),
        prefix_out.stride(0), prefix_out.stride(1), prefix_lse.stride(0), prefix_lse.stride(1),
        suffix_out.stride(0), suffix_out.stride(1), suffix_lse.stride(0), suffix_lse.stride(1),
        rows, heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, WRITE_LSE=return_lse,
        num_warps=4,
    )
    return out, out_lse if return_lse else None


def merge_attn_states_ref(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_out: torch.Tensor,
    suffix_lse: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch LSE merge, same contract as ``merge_attn_states``.

    Arguments:
        prefix_out, prefix_lse, suffix_out, suffix_lse: as in ``merge_attn_states`` (any device).
        compute_dtype: torch.float64 for test references, torch.float32 for a CPU fallback.

    Return:
        out: (num_tokens, num_heads, head_dim) in ``compute_dtype``.
        lse: (num_heads, num_tokens) in ``compute_dtype``.
    """
    inf = float("inf")
    la = prefix_lse.to(compute_dtype).masked_fill(prefix_lse == inf, -inf)
    lb = suffix_lse.to(compute_dtype).masked_fill(suffix_lse == inf, -inf)
    m = torch.maximum(la, lb)
    m_safe = m.masked_fill(m == -inf, 0.0)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    empty = total == 0
    total_safe = total.masked_fill(empty, 1.0)
    # A zero-weight side is dropped with `where`, not multiplied, so garbage in it cannot leak.
    oa = torch.where((wa != 0).T[..., None], prefix_out.to(compute_dtype), 0.0)
    ob = torch.where((wb != 0).T[..., None], suffix_out.to(compute_dtype), 0.0)
    out = oa * (wa / total_safe).T[..., None] + ob * (wb / total_safe).T[..., None]
    lse = torch.where(empty, -inf, m_safe + torch.log(total_safe))
    return out, lse
