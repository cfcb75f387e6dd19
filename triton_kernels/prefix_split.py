"""Sub-sequences of each request's tree queries for the paged-prefix attention (FA3 tile packing).

vLLM's FlashAttention-3 (Hopper) packs the query heads that share a KV head into the rows of its M
tile, and picks one tile height for the whole launch from ``max_seqlen_q``: 64 rows (one MMA
warpgroup) when ``max_seqlen_q * Hq / Hk <= 64``, else 128 rows (head dim 128; 192 at 64).
LongSpec's 69-node tree at 4 query heads per KV head is 276 rows, 3 tiles of 128: 384 rows of MMA
work, and the prefix attention is compute-bound there at long context. The same queries as
sub-sequences of at most 16 that share the request's pages are 5 tiles of 64: 320 rows.

The prefix has no mask, so a query's prefix attention does not depend on which sub-sequence it
sits in; outputs and LSEs keep their rows (``cu_seqlens`` only cuts the same ``q`` differently).
All work is on the device without host syncs and with shapes fixed by ``(batch, max_seqlen_q)``.

Measured on an H100 (``benchmarks/results/h100-2026-12-05``, ``bench_tree_attention
--force-prefix-split``), it loses: FA3's 64-row tile does 1.3-1.45x less work per second than its
128-row tile on these compute-bound shapes, more than the 17% of rows saved. One Llama-3-8B layer,
69 nodes, batch 1: 0.465 ms split against 0.355 ms at 128k, 0.131 against 0.114 ms at 32k; slower
at batch 8 and for 64 and 128 nodes too. So the engine does not use it; ``hybrid_tree_attention``
takes it (``prefix_split=``) and the benchmark keeps timing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PrefixQuerySplit", "fa3_two_warpgroup_rows", "fa_one_warpgroup_chunk",
           "split_prefix_queries"]

FA3_ONE_WARPGROUP_ROWS = 64     # FA3's M tile with one MMA warpgroup (head dims 64 and 128)


def fa3_two_warpgroup_rows(head_dim: int) -> int:
    """Rows of FA3's usual (two-warpgroup) M tile on Hopper for a 16-bit head dim: 192 up to
    96, 128 above (``tile_size_fwd_sm90``)."""
    return 192 if head_dim <= 96 else 128


@dataclass
class PrefixQuerySplit:
    """The prefix attention's sequences after splitting (``S`` sub-sequences per request).

    Attributes:
        cu_seqlens: (batch_size * S + 1,) int32; sub-sequence ``b * S + j`` is the queries
            ``cu_seqlens[b] + j * chunk`` up to ``min(cu_seqlens[b] + (j + 1) * chunk,
            cu_seqlens[b + 1])`` of the original batch (empty when the request is shorter).
        prefix_lens: (batch_size * S,) int32, each request's prefix length repeated S times.
        block_table: (batch_size * S, max_blocks) int32, each request's row repeated S times.
        max_seqlen_q: the chunk, the longest sub-sequence.
    """

    cu_seqlens: torch.Tensor
    prefix_lens: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int


def fa_one_warpgroup_chunk(num_q_heads: int, num_kv_heads: int, max_seqlen_q: int,
                           head_dim: int = 128, *, require_saving: bool = True) -> int:
    """Queries per sub-sequence that put FA3 on its 64-row tile, or 0 when splitting saves no rows.

    Rows of MMA work per KV head (G = Hq / Hk, n = max_seqlen_q, T = the two-warpgroup tile:
    128 rows at head dim 128, 192 at 64): ``ceil(n * G / T) * T`` unsplit, ``ceil(n / c) * 64``
    in sub-sequences of ``c = 64 // G`` queries. Returns ``c`` only when the split has fewer rows
    (69 nodes at G = 4, head dim 128: 320 < 384; 64 nodes: 256 = 256, no split), or whenever the
    64-row tile exists with ``require_saving=False`` (tests, measurements). Only head dims 64 and
    128 have the 64-row tile; 0 for others.
    """
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads or head_dim not in (64, 128):
        return 0
    group = num_q_heads // num_kv_heads
    chunk = FA3_ONE_WARPGROUP_ROWS // group
    if chunk == 0 or max_seqlen_q * group <= FA3_ONE_WARPGROUP_ROWS:
        return 0
    if not require_saving:
        return chunk
    tile = fa3_two_warpgroup_rows(head_dim)
    unsplit = -(-max_seqlen_q * group // tile) * tile
    split = -(-max_seqlen_q // chunk) * FA3_ONE_WARPGROUP_ROWS
    return chunk if split < unsplit else 0


def split_prefix_queries(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                         block_table: torch.Tensor, *, chunk: int,
                         max_seqlen_q: int) -> PrefixQuerySplit:
    """Cut every request's queries into ``ceil(max_seqlen_q / chunk)`` sub-sequences of at most
    ``chunk`` queries that attend the request's whole prefix.

    Arguments:
        cu_seqlens: (batch_size + 1,) int32, the requests' query ranges.
        prefix_lens: (batch_size,) int32.
        block_table: (batch_size, max_blocks) int32.
        chunk: queries per sub-sequence (``fa_one_warpgroup_chunk``), >= 1.
        max_seqlen_q: an upper bound on every request's query count (fixes the shapes).

    Return:
        ``PrefixQuerySplit``; requests with fewer queries get empty trailing sub-sequences.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch = prefix_lens.shape[0]
    per_request = max(1, -(-max_seqlen_q // chunk))
    offsets = torch.arange(per_request, device=cu_seqlens.device, dtype=cu_seqlens.dtype) * chunk
    starts = torch.minimum(cu_seqlens[:-1, None] + offsets, cu_seqlens[1:, None])
    cu = torch.cat([starts.reshape(-1), cu_seqlens[-1:]]).to(torch.int32)
    # contiguous(): with one request the reshapes would be stride-0 views (FA3 rejects them).
    lens = prefix_lens[:, None].expand(batch, per_request).reshape(-1).to(torch.int32)
    table = block_table[:, None, :].expand(batch, per_request, block_table.shape[1])
    table = table.reshape(batch * per_request, block_table.shape[1]).to(torch.int32)
    lens, table = lens.contiguous(), table.contiguous()
    return PrefixQuerySplit(cu, lens, table, min(chunk, max_seqlen_q))
