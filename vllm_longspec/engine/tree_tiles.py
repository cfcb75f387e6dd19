"""How a token tree's verification fills FlashAttention-3's query tiles, and a tree that fills them.

FA3 on Hopper packs the query heads that share a KV head (pack-GQA). A verification step of N
tree nodes is therefore N x (query heads / KV heads) query rows per KV head, computed in tiles of
128 rows (192 at head dims up to 96: `vllm_longspec_kernels.prefix_split.fa3_two_warpgroup_rows`).
At long context that attention is compute-bound, so a tree a few nodes past a tile boundary pays
a whole tile for them. LongSpec's 69-node tree (4,16,16,16,16) at 4 query heads per
KV head is 276 rows, 3 tiles. 4,16,16,16,11 (64 nodes) is 256 rows, 2 tiles: on an H200 at
Llama-3-8B shape its step costs 1.1 ms less at 32k and 4.2 ms less at 128k
(`benchmarks/results/h200-2026-12-04c/`). Output is the same either way; only speed differs.
"""

from __future__ import annotations

import math

FA3_QUERY_TILE_ROWS = 128
# A hint drops at most this share of the drafted nodes (always the deepest, least likely ones).
MAX_DROPPED_SHARE = 0.1


def verification_tiles(num_nodes: int, query_heads_per_kv: int,
                       tile_rows: int = FA3_QUERY_TILE_ROWS) -> int:
    """FA3 query tiles per KV head for a verification of `num_nodes` tokens (root included)."""
    return math.ceil(num_nodes * query_heads_per_kv / tile_rows)


def tile_filling_widths(widths: tuple[int, ...], query_heads_per_kv: int,
                        tile_rows: int = FA3_QUERY_TILE_ROWS) -> tuple[int, ...] | None:
    """`widths` with the fewest deepest nodes removed so that verification needs one FA3 tile
    fewer, or None: when the tree already ends on a tile boundary, when that would drop more
    than `MAX_DROPPED_SHARE` of its drafted nodes, or when a level would lose all its nodes
    (the depth is ``num_speculative_tokens``).

    Args:
        widths: nodes per tree level, e.g. (4, 16, 16, 16, 16).
        query_heads_per_kv: the target's attention heads per KV head (GQA group size).
        tile_rows: rows of FA3's query tile at the target's head dim.
    """
    num_nodes = 1 + sum(widths)
    tiles = verification_tiles(num_nodes, query_heads_per_kv, tile_rows)
    if tiles <= 1:
        return None
    fitting_nodes = (tiles - 1) * tile_rows // query_heads_per_kv
    drop = num_nodes - fitting_nodes
    if drop <= 0 or drop > MAX_DROPPED_SHARE * sum(widths):
        return None
    trimmed = list(widths)
    for level in reversed(range(len(trimmed))):
        take = min(drop, trimmed[level] - 1)
        trimmed[level] -= take
        drop -= take
        if drop == 0:
            return tuple(trimmed)
    return None


def tile_hint(widths: tuple[int, ...], query_heads_per_kv: int,
              tile_rows: int = FA3_QUERY_TILE_ROWS) -> str | None:
    """A one-line suggestion for the engine's log, or None when the tree fills its tiles."""
    trimmed = tile_filling_widths(widths, query_heads_per_kv, tile_rows)
    if trimmed is None:
        return None
    num_nodes = 1 + sum(widths)
    tiles = verification_tiles(num_nodes, query_heads_per_kv, tile_rows)
    return (f"LongSpec: tree_widths {list(widths)} verifies {num_nodes} tokens = "
            f"{num_nodes * query_heads_per_kv} query rows per KV head ({query_heads_per_kv} query "
            f"heads share each), which FlashAttention-3 computes in {tiles} tiles of "
            f"{tile_rows} rows. tree_widths {list(trimmed)} ({1 + sum(trimmed)} tokens) "
            f"needs {tiles - 1}, and its step is cheaper at long context (H200, Llama-3-8B shape: "
            f"4,16,16,16,11 costs 1.1 ms less than 4,16,16,16,16 per step at 32k, 4.2 ms less at "
            f"128k). Output is the same either way.")
