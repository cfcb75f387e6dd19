"""Paged prefix attention for few queries per request: split-KV, GQA-packed (Triton).

Tree verification attends a handful of queries per request (1..128 tree nodes) to a long committed
prefix in vLLM's paged KV cache, with no mask. That is decode-like work: per KV head there are only
``GQA * nodes`` query rows (4 .. 512 at Llama-3-8B's 32/8 heads), so one program per (request,
KV head) leaves most of an H100's 132 SMs idle. This kernel

  * packs the ``GQA`` query heads that share a KV head into the M dimension of one tile
    (row = local_token * GQA + head_in_group), so each K/V tile is loaded once per group;
  * splits every request's prefix into ``num_splits`` contiguous key ranges, one program each
    (grid = m-tiles x (request, KV head) x splits), each writing a normalised partial output and
    its LSE;
  * reduces the partials with their LSEs in a second, tiny kernel (skipped when num_splits == 1).

Output contract = FlashAttention's ``flash_attn_varlen_func(..., return_softmax_lse=True)`` over the
prefix: ``out`` (total_tokens, Hq, D) and the natural-log ``lse`` (Hq, total_tokens); a request with
``prefix_lens[b] == 0`` gets ``out = 0`` and ``lse = -inf`` (what the hybrid merge expects).

``paged_prefix_attention_torch`` is the pure-torch reference (and the CPU path).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tile_steps import tile_dot, values_step

__all__ = [
    "PrefixAttnConfig",
    "default_prefix_attn_config",
    "fa_num_splits_heuristic",
    "num_sms",
    "paged_prefix_attention",
    "paged_prefix_attention_torch",
    "prefix_attn_sweep_configs",
]

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64


def _interpreting() -> bool:
    return type(_prefix_attn_fwd_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int = 0) -> int:
    """Streaming multiprocessors of the CUDA device (132 on an H100 SXM); 1 without CUDA."""
    if not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefixAttnConfig:
    """Tiles and split count. ``block_m`` counts packed (token, query-head-in-group) rows;
    ``num_splits`` is the number of key ranges each (request, KV head) is cut into."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int = 1
    block_t: int = 0

    @property
    def rows_per_program(self) -> int:
        """Packed rows one program covers: a BLOCK_M tile plus an optional BLOCK_T tail tile."""
        return self.block_m + self.block_t

    @classmethod
    def parse(cls, text: str) -> "PrefixAttnConfig":
        """``"BLOCK_M,BLOCK_N,NUM_WARPS,NUM_STAGES,NUM_SPLITS[,BLOCK_T]"`` (the env override)."""
        return cls(*(int(x) for x in text.split(",")))

    def short(self) -> str:
        tail = f"t{self.block_t}" if self.block_t else ""
        return (f"m{self.block_m}{tail}n{self.block_n}w{self.num_warps}s{self.num_stages}"
                f"x{self.num_splits}")


def _wave_splits(base_ctas: int, slots: int, lo: int, hi: int) -> int:
    """Smallest split count in [lo, hi] whose grid (base_ctas * splits programs) fills the
    ``slots`` concurrent program slots to >= 90 % of the best wave efficiency in that range."""
    hi = max(lo, hi)
    effs = []
    for s in range(lo, hi + 1):
        waves = base_ctas * s / slots
        effs.append((waves / -(-waves // 1), s))
    best = max(e for e, _ in effs)
    return next(s for e, s in effs if e >= 0.9 * best)


def default_prefix_attn_config(batch: int, max_seqlen_q: int, max_prefix_len: int,
                               num_q_heads: int, num_kv_heads: int, head_dim: int,
                               dtype: torch.dtype = torch.bfloat16,
                               sms: int | None = None) -> PrefixAttnConfig:
    """Hopper-oriented choice from the problem shape; ``LONGSPEC_PREFIX_ATTN_CONFIG=
    "M,N,warps,stages,splits"`` overrides.

    * block_m: the packed rows per (request, KV head) rounded up to 16/32, else 64 (one
      warpgroup's wgmma M), 128 with 8 warps above 128 rows, plus a 16-row tail tile
      (``block_t``) where that saves a program;
    * block_n: 128 keys per step for thin tiles (memory-bound: more bytes in flight), 64 for
      64-row tiles (register budget of the fp32 accumulator and scores);
    * num_splits: enough programs for two per SM (memory-bound decode wants many loads in flight;
      one per SM for the 8-warp tiles),
      at least 4 key tiles per split, then rounded to avoid a mostly-idle last wave.
    """
    env = os.environ.get("LONGSPEC_PREFIX_ATTN_CONFIG")
    if env:
        return PrefixAttnConfig.parse(env)
    gqa = max(1, num_q_heads // max(num_kv_heads, 1))
    rows = max(1, max_seqlen_q * gqa)
    if _interpreting():
        block_m = 16 if rows <= 16 else 32
        return PrefixAttnConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=1,
                                num_splits=min(4, max(1, max_prefix_len // 64)))
    wide = head_dim > 128 or dtype == torch.float32
    block_t = 0
    if rows > 128 and not wide:
        # 128-row tiles, 8 warps (two wgmma warpgroups) won the H100 sweep from 128 nodes x 4
        # heads and the H200 sweep from 64 x 4. A 16-row tail tile is added when it saves a
        # program per KV head: 69 x 4 = 276 rows run as 2 x (128 + 16) instead of 3 x 128 (2x
        # faster at 128k on the H200; benchmarks/results/h200-2026-12-04c).
        block_m, block_n, warps, stages = 128, 128, 8, 2
        if -(-rows // (block_m + 16)) < -(-rows // block_m):
            block_t = 16
    else:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_n, warps, stages = (64 if (block_m == 64 or wide) else 128), 4, 3
    sms = sms or num_sms()
    m_tiles = -(-rows // (block_m + block_t))
    base = max(1, batch * num_kv_heads * m_tiles)
    max_splits = max(1, min(MAX_SPLITS, max_prefix_len // (4 * block_n)))
    slots = sms if warps == 8 else 2 * sms   # 8-warp 128-row tiles: one program per SM
    want = -(-slots // base)
    if want <= 1:                       # enough programs already: only even out the last wave
        splits = _wave_splits(base, slots, 1, min(max_splits, 2))
    else:
        lo = min(want, max_splits)
        splits = _wave_splits(base, slots, lo, min(max_splits, 2 * lo))
    return PrefixAttnConfig(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                            num_splits=splits, block_t=block_t)


def prefix_attn_sweep_configs(base: PrefixAttnConfig) -> list[PrefixAttnConfig]:
    """A small Hopper search space around ``base`` (for the benchmark's sweep)."""
    out = []
    ms = sorted({base.block_m, 64} | ({128} if base.block_m >= 64 else set()))
    for bm in ms:
        for bn, w, st in ((64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 2)):
            if bm == 128 and w == 4:
                continue
            for s in sorted({max(1, base.num_splits // 2), base.num_splits,
                             min(MAX_SPLITS, base.num_splits * 2)}):
                out.append(PrefixAttnConfig(bm, bn, w, st, s))
                if bm >= 64:
                    out.append(PrefixAttnConfig(bm, bn, w, st, s, block_t=16))
    return list(dict.fromkeys(out))


def fa_num_splits_heuristic(batch: int, max_seqlen_q: int, max_prefix_len: int,
                            num_q_heads: int, num_kv_heads: int, sms: int | None = None,
                            block_m: int = 128, block_n: int = 128) -> int:
    """A ``num_splits`` for FlashAttention-3's prefix call (0 = FA3's own heuristic).

    The idea: FA3 packs GQA rows of varlen queries into 128-row tiles; when batch x KV heads x
    m-tiles already reaches ~0.8 x SMs it does not split, and the last wave may be mostly idle
    (192 tiles on 132 SMs), so pick the split count that evens the waves out; else keep FA3's.

    Measured on the H100 (benchmarks/results/h100-2026-11-23b): it does not help. At the shapes
    where it departs from 0 (batch 8, 69/128 nodes) FA3's own choice was as fast or faster (batch
    8, 128k, 128 nodes: 3.56 ms at 0 vs 4.23 ms at 1); ``hybrid_tree_attention`` therefore uses
    0. Kept for experiments (``bench_tree_attention.py``'s ``fa_prefix_tuned``).
    """
    sms = sms or num_sms()
    gqa = max(1, num_q_heads // max(num_kv_heads, 1))
    m_tiles = -(-max(1, max_seqlen_q * gqa) // block_m)
    base = batch * num_kv_heads * m_tiles
    if base < 0.8 * sms:
        return 0
    n_blocks = -(-max_prefix_len // block_n)
    hi = max(1, min(8, n_blocks // 4))
    return _wave_splits(base, sms, 1, hi)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores_step(q, k, col_ok, m_i, l_i, qk_scale_log2, IEEE_DOT: tl.constexpr):
    """Online-softmax scores of one row tile against one key tile: (p, alpha, m_new, l_new)."""
    qk = tl.where(col_ok[None, :], tile_dot(q, k, IEEE_DOT) * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _load_rows(q_ptr, rows, n, start, kv_head, stride_qt, stride_qh, offs_d, d_ok,
               GQA: tl.constexpr, UPCAST_DOT: tl.constexpr):
    tok = rows // GQA
    head = kv_head * GQA + rows % GQA
    row_ok = tok < n
    tok_g = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok_g[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    return q


@triton.jit
def _store_rows(o_ptr, lse_ptr, acc, m_i, l_i, rows, n, start, kv_head, split,
                stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls, offs_d, d_ok,
                GQA: tl.constexpr, PARTIAL: tl.constexpr):
    tok = rows // GQA
    head = kv_head * GQA + rows % GQA
    row_ok = tok < n
    tok_g = (start + tok).to(tl.int64)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    o_ptrs = o_ptr + tok_g[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if PARTIAL:
        tl.store(o_ptrs + split * stride_os, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + tok_g * stride_lt + head * stride_lh + split * stride_ls, lse2,
                 mask=row_ok)
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + tok_g * stride_lt + head * stride_lh, lse2 * 0.6931471805599453,
                 mask=row_ok)


@triton.jit
def _prefix_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, cu_ptr, o_ptr, lse_ptr,
    qk_scale_log2,  # softmax_scale * log2(e)
    num_kv_heads, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh, stride_ls,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,     # tail rows after the BLOCK_M rows (0 = none), same key tiles
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    PARTIAL: tl.constexpr,     # write (normalised out fp32, log2 LSE) per split, else final
    IEEE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 operands
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    req = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    start = tl.load(cu_ptr + req)
    n = tl.load(cu_ptr + req + 1) - start
    row0 = pid_m * (BLOCK_M + BLOCK_T)
    if row0 < n * GQA:
        seq_len = tl.load(lens_ptr + req)
        # Key range of this split: whole BLOCK_N tiles, the last split takes the remainder.
        per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        k_lo = split * per_split
        k_hi = tl.minimum(seq_len, k_lo + per_split)

        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        rows = row0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr, rows, n, start, kv_head, stride_qt, stride_qh, offs_d, d_ok,
                       GQA, UPCAST_DOT)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # The tail tile lets a CTA cover e.g. 256 + 32 rows (69 nodes x 4 heads = 276) instead
        # of padding to the next multiple of BLOCK_M: every key tile is loaded once for both.
        rows_t = row0 + BLOCK_M + tl.arange(0, BLOCK_T if BLOCK_T > 0 else 16)
        if BLOCK_T > 0:
            q_t = _load_rows(q_ptr, rows_t, n, start, kv_head, stride_qt, stride_qh, offs_d,
                             d_ok, GQA, UPCAST_DOT)
            m_t = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
            l_t = tl.zeros([BLOCK_T], dtype=tl.float32)
            acc_t = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        bt_row = bt_ptr + req.to(tl.int64) * stride_bt
        k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
        v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
        for j0 in range(k_lo, k_hi, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < k_hi
            page = tl.load(bt_row + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
            slot = (cols % PAGE).to(tl.int64)
            k = tl.load(k_head + (page * stride_kb + slot * stride_ks)[None, :] + offs_d[:, None],
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
            p, alpha, m_i, l_i = _scores_step(q, k, col_ok, m_i, l_i, qk_scale_log2, IEEE_DOT)
            if BLOCK_T > 0:
                p_t, alpha_t, m_t, l_t = _scores_step(q_t, k, col_ok, m_t, l_t, qk_scale_log2,
                                                      IEEE_DOT)
            v = tl.load(v_head + (page * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = values_step(p, v, alpha, acc, IEEE_DOT, UPCAST_DOT)
            if BLOCK_T > 0:
                acc_t = values_step(p_t, v, alpha_t, acc_t, IEEE_DOT, UPCAST_DOT)

        _store_rows(o_ptr, lse_ptr, acc, m_i, l_i, rows, n, start, kv_head, split,
                    stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls, offs_d,
                    d_ok, GQA, PARTIAL)
        if BLOCK_T > 0:
            _store_rows(o_ptr, lse_ptr, acc_t, m_t, l_t, rows_t, n, start, kv_head, split,
                        stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls, offs_d,
                        d_ok, GQA, PARTIAL)


@triton.jit
def _prefix_attn_combine_kernel(
    po_ptr, plse_ptr, cu_ptr, o_ptr, lse_ptr,
    batch, num_heads, num_splits,
    stride_pt, stride_ph, stride_ps,
    stride_qt, stride_qh, stride_qs,
    stride_ot, stride_oh,
    stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid // num_heads
    head = pid % num_heads
    if tok < tl.load(cu_ptr + batch):  # padding rows past the last request are left alone
        tok64 = tok.to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        s_ok = s < num_splits
        lse2 = tl.load(plse_ptr + tok64 * stride_qt + head * stride_qh + s * stride_qs,
                       mask=s_ok, other=float("-inf"))
        m = tl.max(lse2, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse2 - m_safe)
        denom = tl.sum(w, 0)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        part = tl.load(po_ptr + tok64 * stride_pt + head * stride_ph + s[:, None] * stride_ps
                       + offs_d[None, :],
                       mask=(s_ok & (lse2 != float("-inf")))[:, None] & d_ok[None, :], other=0.0)
        empty = denom == 0.0
        out = tl.sum(part * w[:, None], 0) / tl.where(empty, 1.0, denom)
        lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(tl.where(empty, 1.0, denom)))
                       * 0.6931471805599453)
        tl.store(o_ptr + tok64 * stride_ot + head * stride_oh + offs_d,
                 out.to(o_ptr.dtype.element_ty), mask=d_ok)
        tl.store(lse_ptr + tok64 * stride_lt + head * stride_lh, lse)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def paged_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: PrefixAttnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of each request's queries over its paged prefix (Triton, split-KV).

    Arguments:
        q: (total_tokens, Hq, head_dim), fp16/bf16/fp32, last dim contiguous; head_dim <= 256.
        k_cache, v_cache: (num_blocks, block_size, Hk, head_dim), q's dtype, any strides with a
            contiguous last dim (vLLM's FlashAttention cache through ``split_kv_cache``).
            Hq % Hk == 0.
        block_table: (batch_size, max_blocks_per_req) int32; entries past
            ``ceil(prefix_lens[b] / block_size)`` are never read.
        prefix_lens: (batch_size,) int32, keys per request (0 = none).
        cu_seqlens: (batch_size + 1,) int32, query tokens of request b are
            ``cu_seqlens[b]:cu_seqlens[b+1]``.
        softmax_scale: default 1 / sqrt(head_dim).
        max_seqlen_q, max_prefix_len: ints (read from the tensors, a device sync, when None).
        out: optional (total_tokens, Hq, head_dim) buffer (q's dtype or fp32), last dim contiguous.
        lse: optional (Hq, total_tokens) fp32 buffer.
        config: tiles and split count; default ``default_prefix_attn_config`` for this shape.

    Return:
        out: (total_tokens, Hq, head_dim); zeros for requests without prefix.
        lse: (Hq, total_tokens) fp32 natural-log LSE; ``-inf`` for requests without prefix.
    """
    total, hq, head_dim = q.shape
    hk = k_cache.shape[2]
    gqa = hq // hk
    batch = cu_seqlens.shape[0] - 1
    if hq % hk or k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if block_table.dtype != torch.int32 or prefix_lens.dtype != torch.int32 \
            or cu_seqlens.dtype != torch.int32:
        raise ValueError("block_table, prefix_lens and cu_seqlens must be int32")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(hq, total, dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must be (total_tokens, Hq, head_dim) with a contiguous last dim")
    if lse.shape != (hq, total) or lse.dtype != torch.float32:
        raise ValueError("lse must be float32 (Hq, total_tokens)")
    if total == 0 or batch == 0:
        return out, lse
    if not (q.is_cuda or _interpreting()):
        ref_out, ref_lse = paged_prefix_attention_torch(
            q, k_cache, v_cache, block_table, prefix_lens, cu_seqlens, softmax_scale)
        out.copy_(ref_out)
        lse.copy_(ref_lse)
        return out, lse
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    if max_prefix_len is None:
        max_prefix_len = int(prefix_lens.max().item()) if prefix_lens.numel() else 0
    if max_seqlen_q == 0:
        return out, lse
    cfg = config or default_prefix_attn_config(batch, max_seqlen_q, max_prefix_len, hq, hk,
                                               head_dim, q.dtype,
                                               None if _interpreting() else
                                               num_sms(q.device.index or 0))
    splits = max(1, min(cfg.num_splits, MAX_SPLITS))
    rows = max_seqlen_q * gqa
    grid = (triton.cdiv(rows, cfg.rows_per_program), batch * hk, splits)
    consts = dict(GQA=gqa, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  BLOCK_M=cfg.block_m, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
                  PAGE=k_cache.shape[1],
                  IEEE_DOT=q.dtype == torch.float32,
                  UPCAST_DOT=_interpreting() and q.dtype == torch.bfloat16,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    common = (q, k_cache, v_cache, block_table, prefix_lens, cu_seqlens)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0))
    scale2 = softmax_scale * _LOG2E
    if splits == 1:
        # lse is (Hq, total): "token" stride = lse.stride(1), head stride = lse.stride(0).
        _prefix_attn_fwd_kernel[grid](
            *common, out, lse, scale2, hk, 1, *strides,
            out.stride(0), out.stride(1), 0, lse.stride(1), lse.stride(0), 0,
            PARTIAL=False, **consts)
        return out, lse
    part_out = torch.empty(total, hq, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(total, hq, splits, dtype=torch.float32, device=q.device)
    _prefix_attn_fwd_kernel[grid](
        *common, part_out, part_lse, scale2, hk, splits, *strides,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        PARTIAL=True, **consts)
    _prefix_attn_combine_kernel[(total * hq,)](
        part_out, part_lse, cu_seqlens, out, lse, batch, hq, splits,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), lse.stride(1), lse.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"],
        BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out, lse


def paged_prefix_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of each request's queries over its paged prefix (pure torch; the
    reference of ``paged_prefix_attention`` and the CPU path of ``hybrid_tree_attention``).

    Arguments: as in ``paged_prefix_attention`` (``k_cache``/``v_cache`` may have any strides).
        compute_dtype: math and output dtype.

    Return:
        out: (total_tokens, Hq, head_dim) in ``compute_dtype``; 0 for requests without prefix.
        lse: (Hq, total_tokens) in ``compute_dtype``; ``-inf`` for requests without prefix.
    """
    total, hq, d = q.shape
    hk = k_cache.shape[2]
    gqa = hq // hk
    bs = k_cache.shape[1]
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    out = torch.zeros(total, hq, d, dtype=compute_dtype, device=q.device)
    lse = torch.full((hq, total), float("-inf"), dtype=compute_dtype, device=q.device)
    cu = cu_seqlens.tolist()
    lens = prefix_lens.tolist()
    for b, plen in enumerate(lens):
        s, e = cu[b], cu[b + 1]
        n = e - s
        if n == 0 or plen == 0:
            continue
        nblk = (plen + bs - 1) // bs
        blocks = block_table[b, :nblk].long()
        kb = k_cache[blocks].reshape(nblk * bs, hk, d)[:plen].to(compute_dtype)   # [L, Hk, D]
        vb = v_cache[blocks].reshape(nblk * bs, hk, d)[:plen].to(compute_dtype)
        qb = q[s:e].to(compute_dtype).reshape(n, hk, gqa, d).permute(1, 2, 0, 3)
        qb = qb.reshape(hk, gqa * n, d)                                             # [Hk, G*n, D]
        scores = (qb @ kb.permute(1, 2, 0)) * softmax_scale                        # [Hk, G*n, L]
        row_lse = torch.logsumexp(scores, -1)
        ob = torch.exp(scores - row_lse[..., None]) @ vb.permute(1, 0, 2)          # [Hk, G*n, D]
        out[s:e] = ob.reshape(hk, gqa, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)
        lse[:, s:e] = row_lse.reshape(hq, n)
    return out, lse
