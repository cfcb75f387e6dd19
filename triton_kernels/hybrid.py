"""Hybrid tree attention: (committed prefix, no mask) + (speculative tree, tree mask), merged exactly.

For every tree token of request ``b``::

    keys = prefix K/V of b (paged cache, prefix_lens[b] tokens, all visible)
         + tree K/V of b   (tree_k/tree_v, visible per tree_mask)
    out  = softmax(q K^T * scale) V over those keys

computed as two partial attentions -- the paged prefix (FlashAttention with ``return_softmax_lse``,
or this package's split-KV Triton kernel ``paged_prefix_attention``) and the Triton tree kernel --
combined by their LSEs (fused into the tree kernel by default). On CPU without the Triton
interpreter the prefix part is pure torch.

A request with ``prefix_lens[b] == 0`` is tree-only; a plain decode is a 1-node tree; a prefill
chunk is a causal chain (see ``tree_attention``'s mask rules) -- all may share one batch.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .merge import merge_attn_states
from .prefix_attention import PrefixAttnConfig, paged_prefix_attention, paged_prefix_attention_torch
from .prefix_split import PrefixQuerySplit
from .tree_attention import (
    TreeAttnConfig,
    is_triton_interpret,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
)

__all__ = [
    "choose_prefix_backend",
    "default_fa_version",
    "flash_attn_available",
    "hybrid_tree_attention",
    "hybrid_tree_attention_ref",
    "paged_prefix_attention_torch",
]

PrefixBackend = Literal["auto", "flash", "triton", "torch"]
TreeBackend = Literal["auto", "triton", "torch"]


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """Whether ``vllm.vllm_flash_attn.flash_attn_varlen_func`` imports (CUDA build of vLLM)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def default_fa_version(device_index: int = 0) -> int:
    """FlashAttention version vLLM would pick on this GPU (3 on Hopper when FA3 is built, else 2)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        version = get_flash_attn_version()
        if version is not None:
            return int(version)
    except Exception:
        pass
    major, _ = torch.cuda.get_device_capability(device_index)
    if major == 9:
        try:
            from vllm.vllm_flash_attn import is_fa_version_supported
            if is_fa_version_supported(3):
                return 3
        except Exception:
            pass
    return 2


def choose_prefix_backend(q: torch.Tensor) -> str:
    """The prefix kernel ``prefix_backend="auto"`` uses for queries ``q``.

    On CUDA: FlashAttention (FA3 on Hopper) when vLLM's FlashAttention imports, else the Triton
    split-KV kernel. On CPU: Triton under ``TRITON_INTERPRET=1``, else torch.

    Measured on an H100 (benchmarks/results/h100-2026-11-23b, Llama-3-8B layer shape): the Triton
    kernel matches FA3 where the prefix is memory-bound (1-16 tree nodes at 128k: within 6 %) and is
    2-2.5x slower where it is compute-bound (69-128 nodes x 4 query heads per KV head), so FA3
    stays the choice whenever it is there.
    """
    if q.is_cuda:
        return "flash" if flash_attn_available() else "triton"
    return "triton" if is_triton_interpret() else "torch"


def _flash_prefix_attention(q, k_cache, v_cache, block_table, prefix_lens, cu_seqlens,
                            max_seqlen_q, max_prefix_len, scale, fa_version, num_splits=0):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    if fa_version is None:
        fa_version = default_fa_version(q.device.index or 0)
    extra = {"num_splits": num_splits} if num_splits and fa_version == 3 else {}
    out, lse = flash_attn_varlen_func(
        q=q, k=k_cache, v=v_cache,
        max_seqlen_q=max_seqlen_q, cu_seqlens_q=cu_seqlens,
        max_seqlen_k=max_prefix_len, seqused_k=prefix_lens,
        block_table=block_table, softmax_scale=scale, causal=False,
        return_softmax_lse=True, fa_version=fa_version, **extra,
    )
    if lse.shape != (q.shape[1], q.shape[0]):
        raise RuntimeError(f"unexpected FlashAttention LSE shape {tuple(lse.shape)}, "
                           f"expected (num_heads, total_tokens) = {(q.shape[1], q.shape[0])}")
    return out, lse


def attend_paged_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    max_seqlen_q: int,
    max_prefix_len: int,
    backend: PrefixBackend = "auto",
    fa_version: int | None = None,
    fa_num_splits: int = 0,
    config: PrefixAttnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of each request's queries over its paged prefix, with LSE.

    Arguments: as in ``hybrid_tree_attention`` (q, caches, block_table, prefix_lens, cu_seqlens);
        backend: ``"flash"``, ``"triton"``, ``"torch"`` or ``"auto"`` (``choose_prefix_backend``).

    Return:
        out: (total_tokens, Hq, head_dim) (q's dtype on flash/triton, fp32 on torch);
        lse: (Hq, total_tokens) fp32.
    """
    if backend == "auto":
        backend = choose_prefix_backend(q)
    if backend == "flash":
        return _flash_prefix_attention(q, k_cache, v_cache, block_table, prefix_lens, cu_seqlens,
                                       max_seqlen_q, max_prefix_len, softmax_scale, fa_version,
                                       fa_num_splits)
    if backend == "triton":
        return paged_prefix_attention(q, k_cache, v_cache, block_table, prefix_lens, cu_seqlens,
                                      softmax_scale, max_seqlen_q=max_seqlen_q,
                                      max_prefix_len=max_prefix_len, config=config)
    return paged_prefix_attention_torch(q, k_cache, v_cache, block_table, prefix_lens,
                                        cu_seqlens, softmax_scale, compute_dtype=torch.float32)


def hybrid_tree_attention(
    q: torch.Tensor,
    prefix_k_cache: torch.Tensor,
    prefix_v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_k: torch.Tensor,
    tree_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    prefix_backend: PrefixBackend = "auto",
    tree_backend: TreeBackend = "auto",
    fuse_merge: bool = True,
    fa_version: int | None = None,
    fa_num_splits: int = 0,
    prefix_config: PrefixAttnConfig | None = None,
    prefix_split: PrefixQuerySplit | None = None,
    tree_config: TreeAttnConfig | None = None,
    tree_autotune: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of tree tokens over their request's committed prefix (paged) plus the tree.

    Arguments:
        q: (total_tokens, Hq, head_dim), fp16/bf16 (fp32 on the torch paths), last dim
            contiguous. Queries of the tree tokens of all requests, packed per ``cu_seqlens``.
        prefix_k_cache: (num_blocks, block_size, Hk, head_dim), q's dtype. Paged keys of the
            committed prefixes (FlashAttention's paged layout; for vLLM caches use
            ``kv_compaction.split_kv_cache``). Any strides with a contiguous last dim; the
            FlashAttention path needs block_size % 16 == 0.
        prefix_v_cache: (num_blocks, block_size, Hk, head_dim), same rules.
        block_table: (batch_size, max_blocks_per_req), dtype torch.int32. Block ids of each
            request's prefix, in order; entries past ``ceil(prefix_lens[b] / block_size)`` are
            ignored.
        prefix_lens: (batch_size,), dtype torch.int32. Committed tokens visible to every tree node
            of the request; 0 = no prefix.
        tree_k: (total_tokens, Hk, head_dim), q's dtype. Keys of the tree tokens. Hq % Hk == 0.
        tree_v: (total_tokens, Hk, head_dim).
        cu_seqlens: (batch_size + 1,), dtype torch.int32. Tree tokens of request b are
            ``cu_seqlens[b]:cu_seqlens[b+1]`` (the ``cu_seqlens_q`` of FlashAttention).
        tree_mask: (total_tokens, W), dtype torch.int32. Packed ancestor bitmask (see
            ``tree_attention``); W = 0 means causal within each request.
        softmax_scale: float. Default 1 / sqrt(head_dim).
        max_seqlen_q: int. Largest tree size; computed (device sync) when None.
        max_prefix_len: int. Largest prefix length; computed (device sync) when None. 0 skips
            the prefix attention entirely.
        out: optional (total_tokens, Hq, head_dim) output buffer (q's dtype or fp32).
        return_lse: also return the merged LSE.
        prefix_backend: ``"flash"`` (vLLM FlashAttention, CUDA), ``"triton"`` (this package's
            split-KV ``paged_prefix_attention``; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"``, or ``"auto"`` (see ``choose_prefix_backend``).
        tree_backend: ``"triton"``, ``"torch"`` (``tree_attention_ref`` in fp32) or ``"auto"``
            (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        fuse_merge: on the Triton tree path, merge the prefix inside the tree kernel (default)
            instead of a separate ``merge_attn_states`` launch.
        fa_version: FlashAttention version for the prefix (default: vLLM's choice, 3 on Hopper).
        fa_num_splits: FA3's ``num_splits`` for the prefix; 0 (default) = FA3's own heuristic,
            which was the fastest or within noise of it at every swept shape on the H100
            (``fa_num_splits_heuristic`` and fixed values 1..32 did not beat it).
        prefix_config: tiles/splits of the Triton prefix kernel (default: its heuristic).
        prefix_split: the prefix attention's sequences cut into sub-sequences of few queries
            (``split_prefix_queries`` of this call's cu_seqlens/prefix_lens/block_table; on FA3
            it selects the 64-row tile, which measured slower, see ``prefix_split``). None (the
            default): one sequence per request.
        tree_config: tile sizes of the Triton tree kernel (default: ``default_tree_attn_config``).
        tree_autotune: let ``triton.autotune`` pick the tree kernel's tile sizes.

    Return:
        out: (total_tokens, Hq, head_dim), the attention output (``out``'s dtype, q's by default).
        lse: (Hq, total_tokens) fp32 natural-log LSE over prefix + tree; only if ``return_lse``.
    """
    total, hq, head_dim = q.shape
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(hq, total, dtype=torch.float32, device=q.device)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if total else 0
    if max_prefix_len is None:
        max_prefix_len = int(prefix_lens.max().item()) if prefix_lens.numel() else 0

    if prefix_backend == "auto":
        prefix_backend = choose_prefix_backend(q)
    if tree_backend == "auto":
        tree_backend = "triton" if q.is_cuda or is_triton_interpret() else "torch"

    prefix_out = prefix_lse = None
    if max_prefix_len > 0:
        seqs = (prefix_split or PrefixQuerySplit(cu_seqlens, prefix_lens, block_table,
                                                 max_seqlen_q))
        prefix_out, prefix_lse = attend_paged_prefix(
            q, prefix_k_cache, prefix_v_cache, seqs.block_table, seqs.prefix_lens,
            seqs.cu_seqlens, softmax_scale, max_seqlen_q=seqs.max_seqlen_q,
            max_prefix_len=max_prefix_len, backend=prefix_backend, fa_version=fa_version,
            fa_num_splits=fa_num_splits, config=prefix_config)

    if tree_backend == "triton":
        tuning = dict(max_seqlen=max_seqlen_q, config=tree_config, autotune=tree_autotune)
        if prefix_out is None or fuse_merge:
            tree_attention(q, tree_k, tree_v, cu_seqlens, tree_mask, softmax_scale, out=out,
                           lse=lse, prefix_out=prefix_out, prefix_lse=prefix_lse,
                           prefix_lens=prefix_lens if prefix_out is not None else None, **tuning)
        else:
            tree_out, tree_lse = tree_attention(q, tree_k, tree_v, cu_seqlens, tree_mask,
                                                softmax_scale, **tuning)
            merge_attn_states(prefix_out, prefix_lse, tree_out, tree_lse, out=out, out_lse=lse)
    else:
        tree_out, tree_lse = tree_attention_ref(q, tree_k, tree_v, cu_seqlens, tree_mask,
                                                softmax_scale, compute_dtype=torch.float32)
        if prefix_out is None:
            out.copy_(tree_out)
            lse.copy_(tree_lse)
        else:
            merge_attn_states(prefix_out, prefix_lse, tree_out, tree_lse, out=out, out_lse=lse)
    return (out, lse) if return_lse else out


def hybrid_tree_attention_ref(
    q: torch.Tensor,
    prefix_k_cache: torch.Tensor,
    prefix_v_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_k: torch.Tensor,
    tree_v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference: one dense softmax per request over [prefix | tree] with the mask
    ``[all ones (n x L) | tree visibility (n x n)]``. Slow; for tests and ``--check``.

    Arguments: as in ``hybrid_tree_attention``.

    Return:
        out: (total_tokens, Hq, head_dim), float64.
        lse: (Hq, total_tokens), float64, natural log.
    """
    total, hq, d = q.shape
    hk = tree_k.shape[1]
    gqa = hq // hk
    bs = prefix_k_cache.shape[1]
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    f64 = torch.float64
    out = torch.zeros(total, hq, d, dtype=f64, device=q.device)
    lse = torch.full((hq, total), float("-inf"), dtype=f64, device=q.device)
    cu = cu_seqlens.tolist()
    for b, (vis, plen) in enumerate(zip(unpack_tree_mask(tree_mask, cu_seqlens),
                                        prefix_lens.tolist())):
        s, e = cu[b], cu[b + 1]
        n = e - s
        if n == 0:
            continue
        pos = torch.arange(plen, device=q.device)
        blocks = block_table[b].long()[pos // bs]
        keys = torch.cat([prefix_k_cache[blocks, pos % bs].to(f64), tree_k[s:e].to(f64)])
        vals = torch.cat([prefix_v_cache[blocks, pos % bs].to(f64), tree_v[s:e].to(f64)])
        visible = torch.cat([torch.ones(n, plen, dtype=torch.bool), vis], 1).to(q.device)
        keys = keys.transpose(0, 1).repeat_interleave(gqa, 0)                 # [Hq, L + n, D]
        vals = vals.transpose(0, 1).repeat_interleave(gqa, 0)
        scores = (q[s:e].to(f64).transpose(0, 1) @ keys.transpose(1, 2)) * softmax_scale
        scores = scores.masked_fill(~visible, float("-inf"))                  # [Hq, n, L + n]
        lse[:, s:e] = torch.logsumexp(scores, -1)
        out[s:e] = (torch.softmax(scores, -1) @ vals).transpose(0, 1)
    return out, lse
