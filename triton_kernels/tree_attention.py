"""Tree attention: each request's speculative tokens attend to each other under a tree mask.

Queries and keys/values are the same packed, variable-length token runs ("varlen", as in
FlashAttention): request ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``q``, ``k`` and
``v``. Inside a request, node ``i`` may attend to node ``j`` iff ``j`` is an ancestor of ``i`` or
``i`` itself. Nodes are topologically ordered (``parent[i] < i``; BFS order satisfies this).

Mask representation (``tree_mask``): an int32 bitmask ``[T, W]``, one row per token. Bit ``j % 32``
of word ``j // 32`` of token ``i``'s row is set iff local node ``j`` is visible to local node ``i``.
The kernel applies::

    visible(i, j) = j <= i  and  (i >= 32 * W  or  bit(i, j))

so rows past the bitmask window (``i >= 32 * W``) are plain causal. That makes a prefill chunk (a
causal chain) longer than the window legal in the same launch, and ``W = 0`` means "all causal".
``build_tree_mask`` / ``tree_mask_from_parents`` build the bitmask from parent arrays.

The kernel returns the softmax-normalised output and the natural-log LSE ``[Hq, T]`` (the layout of
FlashAttention's ``softmax_lse``), so the result merges exactly with a prefix attention. It can also
fuse that merge: pass ``prefix_out``/``prefix_lse`` and the online softmax starts from the prefix's
partial state instead of from zero.

GQA: the ``Hq // Hk`` query heads that share a KV head are packed into the M dimension of one tile,
so each K/V tile is loaded once per group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .prefix_attention import num_sms
from .tile_steps import tile_dot, values_step

__all__ = [
    "TreeAttnConfig",
    "build_tree_mask",
    "default_tree_attn_config",
    "hopper_tree_attn_config",
    "is_triton_interpret",
    "tree_attention",
    "tree_attention_ref",
    "tree_attn_autotune_configs",
    "tree_mask_from_parents",
    "tree_mask_num_words",
    "unpack_tree_mask",
]

_LOG2E = 1.4426950408889634


def is_triton_interpret() -> bool:
    """True when this package's kernels were built for Triton's CPU interpreter, i.e.
    ``TRITON_INTERPRET=1`` was set when the package was imported (Triton decides at decoration
    time). Interpreted kernels take CPU tensors."""
    return type(_tree_attn_fwd_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# Mask construction
# ---------------------------------------------------------------------------------------------


def tree_mask_num_words(max_nodes: int) -> int:
    """Number of int32 words per bitmask row needed for trees of up to ``max_nodes`` nodes."""
    return (max_nodes + 31) // 32


def _is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def _validate_parents(parents: Sequence[int], req: int) -> None:
    for i, p in enumerate(parents):
        if not (-1 <= p < i):
            raise ValueError(f"request {req}: parent[{i}] = {p} must satisfy -1 <= parent < {i}")


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., 32 * W] -> int32 [..., W] (bit k of word w = column 32 * w + k)."""
    w = bits.shape[-1] // 32
    weights = torch.tensor([1 << k for k in range(32)], dtype=torch.int64, device=bits.device)
    words = (bits.reshape(*bits.shape[:-1], w, 32).to(torch.int64) * weights).sum(-1)
    # Reinterpret the unsigned 32-bit value as int32 (bit 31 -> sign bit).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def build_tree_mask(
    parents: Sequence[Sequence[int]],
    num_words: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Builds the packed ancestor bitmask from per-request parent arrays (host-side helper).

    Arguments:
        parents: one sequence per request; ``parents[b][i]`` is the local index of node ``i``'s
            parent in request ``b``, ``-1`` for a root. Must satisfy ``parents[b][i] < i``
            (topological / BFS order). Several roots are allowed (a forest); a request of ``n``
            tokens with ``parents = [-1, 0, 1, ..., n-2]`` is a causal chain (a prefill chunk or
            plain decode when ``n == 1``).
        num_words: W, the number of int32 words per row. Default: just enough for the largest
            request that is not a chain (0 if all requests are chains). A request longer than
            ``32 * W`` must be a chain (its rows past the window are treated as causal).
        device: device of the returned tensor (default CPU).

    Return:
        tree_mask: (total_tokens, W), dtype torch.int32, rows packed in request order (the same
            order as ``q``/``k``/``v`` under ``cu_seqlens``).
    """
    for b, par in enumerate(parents):
        _validate_parents(par, b)
    if num_words is None:
        tree_sizes = [len(p) for p in parents if not _is_chain(p)]
        num_words = tree_mask_num_words(max(tree_sizes, default=0))
    window = 32 * num_words
    rows = []
    for b, par in enumerate(parents):
        n = len(par)
        if n > window and not _is_chain(par):
            raise ValueError(
                f"request {b} has {n} nodes > 32 * num_words = {window} and is not a chain")
        bits = torch.zeros(n, window, dtype=torch.bool)
        for i in range(min(n, window)):
            p = par[i]
            if p >= 0:
                bits[i] = bits[p]
            bits[i, i] = True
        rows.append(bits)
    bits = torch.cat(rows, 0) if rows else torch.zeros(0, window, dtype=torch.bool)
    return _pack_bits(bits).to(device) if window else torch.zeros(
        bits.shape[0], 0, dtype=torch.int32, device=device)


def tree_mask_from_parents(
    parents: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_words: int,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Builds the packed ancestor bitmask on-device from packed parent indices (no host loop).

    Ancestry is the transitive closure of the parent relation, computed by pointer doubling
    (``ceil(log2(n))`` batched boolean matmuls over the ``min(n, 32 * W)`` window).

    Arguments:
        parents: (total_tokens,), integer dtype. Local parent index of each token within its request,
            ``-1`` for roots; ``parents[i] < local index of i``. Not validated (no device sync).
        cu_seqlens: (batch_size + 1,), dtype torch.int32. Request boundaries.
        num_words: W, int32 words per row. Requests longer than ``32 * W`` must be chains.
        max_seqlen: int. Largest request length; computed from ``cu_seqlens`` (a device sync)
            when not given.

    Return:
        tree_mask: (total_tokens, W), dtype torch.int32, on ``parents.device``.
    """
    device = parents.device
    total = parents.shape[0]
    window = 32 * num_words
    if window == 0 or total == 0:
        return torch.zeros(total, num_words, dtype=torch.int32, device=device)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lens.shape[0]
    if max_seqlen is None:
        max_seqlen = int(lens.max().item()) if batch else 0
    n = min(max_seqlen, window)
    # Token -> (request, local index).
    req = torch.repeat_interleave(torch.arange(batch, device=device), lens, output_size=total)
    local = torch.arange(total, device=device) - cu_seqlens[:-1].long()[req]
    inside = local < n
    r, li, pa = req[inside], local[inside], parents[inside].long()
    # anc[b, i, j]: j is i or an ancestor of i (within the window).
    anc = torch.zeros(batch, n, n, dtype=torch.float32, device=device)
    anc[r, li, li] = 1.0
    has_parent = pa >= 0
    anc[r[has_parent], li[has_parent], pa[has_parent]] = 1.0
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
        anc = ((anc + torch.bmm(anc, anc)) > 0).to(torch.float32)
    bits = torch.zeros(total, window, dtype=torch.bool, device=device)
    bits[inside, :n] = anc[r, li] > 0
    return _pack_bits(bits)


def unpack_tree_mask(tree_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Expands the packed bitmask into one dense visibility matrix per request (for references).

    Arguments:
        tree_mask: (total_tokens, W), dtype torch.int32 (see the module docstring).
        cu_seqlens: (batch_size + 1,), integer dtype.

    Return:
        list of ``batch_size`` bool tensors (n_b, n_b) on CPU; ``[i, j]`` is True iff local node
        ``i`` attends to local node ``j``, applying the same causal rule as the kernel.
    """
    mask = tree_mask.cpu().to(torch.int64) & 0xFFFFFFFF
    window = 32 * mask.shape[1]
    shifts = torch.arange(32, dtype=torch.int64)
    cu = cu_seqlens.cpu().tolist()
    dense = []
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        n = e - s
        bits = ((mask[s:e, :, None] >> shifts) & 1).bool().reshape(n, window)
        vis = torch.ones(n, n, dtype=torch.bool).tril()
        w = min(n, window)
        vis[:w, :w] &= bits[:w, :w]
        dense.append(vis)
    return dense


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeAttnConfig:
    """Tile sizes of the tree kernel. ``block_m`` counts packed (token, query-head-in-group) rows."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def parse(cls, text: str) -> "TreeAttnConfig":
        """``"BLOCK_M,BLOCK_N,NUM_WARPS,NUM_STAGES"`` -> config (used by the env override)."""
        return cls(*(int(x) for x in text.split(",")))


def default_tree_attn_config(head_dim: int, dtype: torch.dtype, rows: int | None = None,
                             programs_per_row_tile: int | None = None,
                             sms: int | None = None) -> TreeAttnConfig:
    """Hopper-tuned defaults; ``LONGSPEC_TREE_ATTN_CONFIG="M,N,warps,stages"`` overrides.

    The tree part is tiny (<= a few hundred keys per request) and latency-bound: at batch 1 its
    cost is the dependent memory round trips of one program, not FLOPs. Measured on an H200
    (CUDA-graph replays, bf16, head dim 128, GQA 4, L2 flushed; benchmarks/results/
    h200-2026-12-03c/tree_floor_log.txt), 16-row tiles were the fastest wherever the grid stays
    within ~2 programs per SM (batch 1 at 69 nodes: 11.9 us against 18.9 us for 64x64 tiles),
    and 64x32 tiles with one stage beyond that (batch 8 at 69 nodes: 23.8 us against 39.1 us).

    Arguments:
        head_dim, dtype: of the queries.
        rows: packed query rows per (request, KV head), ``max_seqlen * (Hq // Hk)``; None keeps
            the shape-independent choice (64x64).
        programs_per_row_tile: programs per row tile, ``batch * Hk`` (the grid's other axes).
        sms: streaming multiprocessors (default: the current CUDA device's).
    """
    env = os.environ.get("LONGSPEC_TREE_ATTN_CONFIG")
    if env:
        return TreeAttnConfig.parse(env)
    if is_triton_interpret():
        return TreeAttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)
    return hopper_tree_attn_config(head_dim, dtype, rows, programs_per_row_tile, sms)


def hopper_tree_attn_config(head_dim: int, dtype: torch.dtype, rows: int | None,
                            programs_per_row_tile: int | None,
                            sms: int | None = None) -> TreeAttnConfig:
    """The compiled-kernel choice of `default_tree_attn_config` (same arguments)."""
    wide = head_dim > 128 or dtype == torch.float32
    if wide:
        return TreeAttnConfig(block_m=64, block_n=32, num_warps=8 if head_dim > 128 else 4,
                              num_stages=2)
    if rows is None or programs_per_row_tile is None:
        return TreeAttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    sms = sms or num_sms()
    if programs_per_row_tile * -(-rows // 16) <= 2 * sms:
        return TreeAttnConfig(block_m=16, block_n=64, num_warps=4, num_stages=2)
    return TreeAttnConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)


def tree_attn_autotune_configs() -> list[triton.Config]:
    """Search space for ``tree_attention(..., autotune=True)`` (Hopper-sized)."""
    configs = []
    for bm in (32, 64, 128):
        for bn in (32, 64):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    if bm == 128 and warps == 4:
                        continue
                    configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn},
                                                 num_warps=warps, num_stages=stages))
    return configs


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tree_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, cu_seqlens_ptr,
    p_out_ptr, p_lse_ptr, p_lens_ptr,
    qk_scale_log2,  # softmax_scale * log2(e)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh, stride_lt, stride_mt,
    stride_pot, stride_poh, stride_plh, stride_plt,
    num_words,
    rows_bucket,  # autotune key only: next_pow2(max_seqlen * GQA)
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_PREFIX_LENS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bf16 operands
):
    pid_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + req)
    n = tl.load(cu_seqlens_ptr + req + 1) - start
    row0 = pid_m * BLOCK_M
    if row0 < n * GQA:
        # Packed rows: row = local_token * GQA + query_head_in_group.
        rows = row0 + tl.arange(0, BLOCK_M)
        tok = rows // GQA
        head = kv_head * GQA + rows % GQA
        row_ok = tok < n
        tok_g = (start + tok).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM

        q = tl.load(q_ptr + tok_g[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)

        # Online-softmax state in log2 units of the scaled scores.
        if HAS_PREFIX:
            lse_p = tl.load(p_lse_ptr + head * stride_plh + tok_g * stride_plt,
                            mask=row_ok, other=float("-inf"))
            if HAS_PREFIX_LENS:
                lse_p = tl.where(tl.load(p_lens_ptr + req) > 0, lse_p, float("-inf"))
            # +inf is FlashAttention-2's LSE of an empty row; NaN is kept (it propagates).
            has_p = (lse_p != float("-inf")) & (lse_p != float("inf"))
            # An empty prefix's output may be uninitialised: never read it.
            acc = tl.load(p_out_ptr + tok_g[:, None] * stride_pot + head[:, None] * stride_poh
                          + offs_d[None, :],
                          mask=(row_ok & has_p)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            m_i = tl.where(has_p, lse_p * 1.4426950408889634, float("-inf"))
            l_i = tl.where(has_p, 1.0, 0.0)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        causal_row = tok >= num_words * 32
        # Keys [0, kv_end) can be visible to some row of this tile (visibility implies j <= i).
        kv_end = tl.minimum(n, (row0 + BLOCK_M - 1) // GQA + 1)
        for j0 in range(0, kv_end, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < kv_end
            cols_g = (start + cols).to(tl.int64)
            k = tl.load(k_ptr + cols_g[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
            qk = tile_dot(q, k, IEEE_DOT) * qk_scale_log2

            words = tl.load(mask_ptr + tok_g[:, None] * stride_mt + (cols // 32)[None, :],
                            mask=(row_ok & (tok < num_words * 32))[:, None] & col_ok[None, :],
                            other=0)
            bit = (words >> (cols % 32)[None, :]) & 1
            visible = (cols[None, :] <= tok[:, None]) & col_ok[None, :] & (
                (bit != 0) | causal_row[:, None])
            qk = tl.where(visible, qk, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qk - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + cols_g[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = values_step(p, v, alpha, acc, IEEE_DOT, UPCAST_DOT)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(out_ptr + tok_g[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + head * stride_lh + tok_g * stride_lt, lse, mask=row_ok)


_tree_attn_fwd_autotuned = triton.autotune(
    configs=tree_attn_autotune_configs(),
    key=["rows_bucket", "GQA", "HEAD_DIM", "HAS_PREFIX"],
)(_tree_attn_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, cu_seqlens, tree_mask):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be (total_tokens, heads, head_dim)")
    t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"num q heads {hq} must be a multiple of num kv heads {k.shape[1]}")
    if tree_mask.dim() != 2 or tree_mask.shape[0] != t or tree_mask.dtype != torch.int32:
        raise ValueError("tree_mask must be int32 (total_tokens, num_words)")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be int32")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    max_seqlen: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    prefix_out: torch.Tensor | None = None,
    prefix_lse: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    config: TreeAttnConfig | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree-masked attention of each request's tokens over the same tokens (Triton).

    Supports GQA/MQA: query head ``h`` uses KV head ``h // (Hq // Hk)`` (FlashAttention's mapping).
    Runs the Triton kernel on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``);
    other CPU calls use a pure-torch fp32 path with the same contract (config/autotune ignored).

    Arguments:
        q: (total_tokens, Hq, head_dim), fp16/bf16/fp32, head_dim <= 256 (any size; padded to a
            power of two >= 16 inside), last dim contiguous. Queries of the tree tokens, packed
            request after request.
        k: (total_tokens, Hk, head_dim), same dtype. Keys of the same tokens. Hq % Hk == 0.
        v: (total_tokens, Hk, head_dim), same dtype.
        cu_seqlens: (batch_size + 1,), dtype torch.int32. Request b owns tokens
            ``cu_seqlens[b]:cu_seqlens[b+1]``; empty requests are allowed. Tokens past
            ``cu_seqlens[-1]`` (padding) are neither read nor written.
        tree_mask: (total_tokens, W), dtype torch.int32. Packed ancestor bitmask: bit ``j % 32``
            of word ``j // 32`` in the row of the request's local node ``i`` is set iff node ``j``
            is ``i`` or an ancestor of ``i``. Applied as ``j <= i and (i >= 32 * W or bit)``:
            rows past the window are causal (long prefill chunks), W = 0 is fully causal.
            Build with ``build_tree_mask`` / ``tree_mask_from_parents``.
        softmax_scale: float. Scale of QK^T before the softmax. Default 1 / sqrt(head_dim).
        max_seqlen: int. Largest request length; read from ``cu_seqlens`` (a device sync) when
            None. Must be >= every request length.
        out: optional (total_tokens, Hq, head_dim) output buffer, dtype of q or fp32; any strides
            with a contiguous last dim. Default: a new tensor of q's dtype.
        lse: optional (Hq, total_tokens) fp32 buffer for the LSE.
        prefix_out: optional (total_tokens, Hq, head_dim) partial attention of the same queries
            over other keys (e.g. the committed prefix), any float dtype. When given, the result
            is the exact softmax over (those keys) + (the tree), i.e. the LSE merge is fused.
        prefix_lse: (Hq, total_tokens) fp32 natural-log LSE of ``prefix_out``; required with
            ``prefix_out``. ``-inf`` or ``+inf`` (FlashAttention-2's value for an empty row) mean
            "no prefix keys": the corresponding ``prefix_out`` row is then never read.
        prefix_lens: optional (batch_size,) int32; requests with ``prefix_lens[b] == 0`` ignore
            ``prefix_out``/``prefix_lse`` entirely (robust to uninitialised FlashAttention output).
        config: tile sizes; default ``default_tree_attn_config``.
        autotune: pick tile sizes with ``triton.autotune`` (cached per shape bucket).

    Return:
        out: (total_tokens, Hq, head_dim), softmax(QK^T * scale, tree mask) V, in ``out``'s
            dtype (q's dtype by default).
        lse: (Hq, total_tokens), dtype torch.float32. Natural-log logsumexp of the scaled, masked
            scores of each row (including the prefix when fused), like FlashAttention's
            ``softmax_lse``.
    """
    _check_inputs(q, k, v, cu_seqlens, tree_mask)
    total, hq, head_dim = q.shape
    hk = k.shape[1]
    gqa = hq // hk
    batch = cu_seqlens.shape[0] - 1
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
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    if max_seqlen == 0:
        return out, lse
    if not (q.is_cuda or is_triton_interpret()):
        return _tree_attention_torch(q, k, v, cu_seqlens, tree_mask, softmax_scale, out, lse,
                                     prefix_out, prefix_lse, prefix_lens)

    has_prefix = prefix_out is not None
    if has_prefix:
        if prefix_lse is None:
            raise ValueError("prefix_out needs prefix_lse")
        if prefix_out.shape != q.shape or prefix_out.stride(-1) != 1:
            raise ValueError("prefix_out must be (total_tokens, Hq, head_dim), last dim contiguous")
        if prefix_lse.shape != (hq, total):
            raise ValueError("prefix_lse must be (Hq, total_tokens)")
        p_out, p_lse = prefix_out, prefix_lse.float()
    else:
        p_out, p_lse = out, lse  # unused placeholders
    has_lens = has_prefix and prefix_lens is not None
    p_lens = prefix_lens if has_lens else cu_seqlens

    num_words = tree_mask.shape[1]
    # A zero-size tensor has no valid pointer on the GPU; the kernel never reads it when W == 0.
    mask_arg = tree_mask if num_words > 0 else torch.zeros(1, 1, dtype=torch.int32,
                                                           device=q.device)

    rows = max_seqlen * gqa
    args = (
        q, k, v, out, lse, mask_arg, cu_seqlens, p_out, p_lse, p_lens,
        softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), mask_arg.stride(0),
        p_out.stride(0), p_out.stride(1), p_lse.stride(0), p_lse.stride(1),
        num_words, triton.next_power_of_2(rows),
    )
    consts = dict(
        GQA=gqa, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_PREFIX=has_prefix, HAS_PREFIX_LENS=has_lens, IEEE_DOT=q.dtype == torch.float32,
        UPCAST_DOT=is_triton_interpret() and q.dtype == torch.bfloat16,
    )
    if autotune and not is_triton_interpret():
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), hk, batch)  # noqa: E731
        _tree_attn_fwd_autotuned[grid](*args, **consts)
    else:
        cfg = config or default_tree_attn_config(head_dim, q.dtype, rows, hk * batch)
        grid = (triton.cdiv(rows, cfg.block_m), hk, batch)
        _tree_attn_fwd_kernel[grid](*args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _tree_attention_torch(q, k, v, cu_seqlens, tree_mask, softmax_scale, out, lse,
                          prefix_out, prefix_lse, prefix_lens):
    """CPU fallback with the same contract as the kernel (fp32 math)."""
    from .merge import merge_attn_states_ref

    o, l = tree_attention_ref(q, k, v, cu_seqlens, tree_mask, softmax_scale,
                              compute_dtype=torch.float32)
    if prefix_out is not None:
        p_lse = prefix_lse.float()
        if prefix_lens is not None:
            sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            empty = torch.repeat_interleave(prefix_lens == 0, sizes, output_size=q.shape[0])
            p_lse = p_lse.masked_fill(empty[None, :], float("-inf"))
        o, l = merge_attn_states_ref(prefix_out, p_lse, o, l, compute_dtype=torch.float32)
    end = int(cu_seqlens[-1])
    out[:end].copy_(o[:end])
    lse[:, :end].copy_(l[:, :end])
    return out, lse


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def tree_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch tree attention (one request at a time, dense masks); same contract as
    ``tree_attention`` without the fused prefix.

    Arguments:
        q, k, v, cu_seqlens, tree_mask, softmax_scale: as in ``tree_attention`` (any device).
        compute_dtype: torch.float64 for test references, torch.float32 for a CPU fallback.

    Return:
        out: (total_tokens, Hq, head_dim) in ``compute_dtype``.
        lse: (Hq, total_tokens) in ``compute_dtype``, natural log.
    """
    total, hq, head_dim = q.shape
    hk = k.shape[1]
    gqa = hq // hk
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    out = torch.zeros(total, hq, head_dim, dtype=compute_dtype, device=q.device)
    lse = torch.full((hq, total), float("-inf"), dtype=compute_dtype, device=q.device)
    cu = cu_seqlens.tolist()
    for b, vis in enumerate(unpack_tree_mask(tree_mask, cu_seqlens)):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        qb = q[s:e].to(compute_dtype).transpose(0, 1)                        # [Hq, n, D]
        kb = k[s:e].to(compute_dtype).transpose(0, 1).repeat_interleave(gqa, 0)
        vb = v[s:e].to(compute_dtype).transpose(0, 1).repeat_interleave(gqa, 0)
        scores = (qb @ kb.transpose(1, 2)) * softmax_scale                     # [Hq, n, n]
        scores = scores.masked_fill(~vis.to(q.device), float("-inf"))
        row_lse = torch.logsumexp(scores, -1)                                 # [Hq, n]
        out[s:e] = (torch.softmax(scores, -1) @ vb).transpose(0, 1)
        lse[:, s:e] = row_lse
    return out, lse
