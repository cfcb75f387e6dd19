"""A tree's FA3 query tiles and the trimmed tree suggested in the engine's log (`tree_tiles`)."""

from __future__ import annotations

import importlib
import logging
import pkgutil

import pytest

import vllm_longspec
from vllm_longspec.engine.tree_tiles import tile_filling_widths, tile_hint, verification_tiles

LONGSPEC_TREE = (4, 16, 16, 16, 16)


@pytest.mark.parametrize("heads_per_kv, tiles", [(1, 1), (2, 2), (4, 3), (6, 4), (8, 5)])
def test_tiles_of_the_69_node_tree(heads_per_kv, tiles):
    assert verification_tiles(69, heads_per_kv) == tiles


@pytest.mark.parametrize("widths, heads_per_kv, expected", [
    (LONGSPEC_TREE, 4, (4, 16, 16, 16, 11)),   # 276 -> 256 rows (Llama-3-8B)
    (LONGSPEC_TREE, 6, (4, 16, 16, 16, 11)),   # 414 -> 384 rows (Qwen2.5-1.5B)
    (LONGSPEC_TREE, 8, (4, 16, 16, 16, 11)),   # 552 -> 512 rows
    ((16, 16, 16, 16), 2, (16, 16, 16, 15)),   # 130 -> 128 rows
    ((63, 2), 2, (62, 1)),                     # the deepest level keeps one node, then the next
    ((4, 16, 16, 16, 11), 4, None),            # already ends on a tile boundary
    (LONGSPEC_TREE, 1, None),                  # one tile
    (LONGSPEC_TREE, 3, None),                  # 207 -> 126 rows would drop 27 of 68 nodes
])
def test_tile_filling_widths(widths, heads_per_kv, expected):
    trimmed = tile_filling_widths(widths, heads_per_kv)
    assert trimmed == expected
    if trimmed is not None:
        assert len(trimmed) == len(widths) and min(trimmed) >= 1
        assert all(t <= w for t, w in zip(trimmed, widths))
        assert (verification_tiles(1 + sum(trimmed), heads_per_kv)
                == verification_tiles(1 + sum(widths), heads_per_kv) - 1)


def test_hint_names_both_trees_and_their_tiles():
    hint = tile_hint(LONGSPEC_TREE, 4)
    assert hint is not None
    assert "[4, 16, 16, 16, 16]" in hint and "[4, 16, 16, 16, 11]" in hint
    assert "276 query rows" in hint and "3 tiles" in hint and "needs 2" in hint
    assert tile_hint((4, 16, 16, 16, 11), 4) is None


def test_head_dims_up_to_96_have_192_row_tiles():
    # SmolLM2-135M (head dim 64, 3 query heads per KV head): 69 nodes = 207 rows, two 192-row
    # tiles; 64 nodes fill one. At 128-row tiles the same tree would drop too many nodes.
    assert tile_filling_widths(LONGSPEC_TREE, 3, tile_rows=192) == (4, 16, 16, 16, 11)
    assert tile_filling_widths(LONGSPEC_TREE, 3) is None
    # Two query heads per KV head: 138 rows fit one 192-row tile, nothing to trim.
    assert tile_hint(LONGSPEC_TREE, 2, tile_rows=192) is None
    assert "2 tiles of 192 rows" in tile_hint(LONGSPEC_TREE, 3, tile_rows=192)


def test_plugin_loggers_sit_under_vllms_logger():
    """vLLM configures the "vllm" logger (handler, format, VLLM_LOGGING_LEVEL); the plugin's
    INFO lines only reach a user's log if its loggers are children of it."""
    names = set()
    for module in pkgutil.walk_packages(vllm_longspec.__path__, "vllm_longspec."):
        if module.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            loaded = importlib.import_module(module.name)
        except Exception:  # noqa: BLE001 -- modules that need a GPU or vLLM's V2 runner
            continue
        for value in vars(loaded).values():
            if isinstance(value, logging.Logger):
                names.add(value.name)
    assert names, "no module-level loggers found"
    assert all(name.startswith("vllm.") for name in names), names
