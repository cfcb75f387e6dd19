"""LongSpec's dynamic beam tree, batched over requests (no per-node Python loops).

Level 1 holds the root's top-``w_1`` tokens; level l+1 the global top-``w_{l+1}`` over
(nodes of level l) x (vocabulary) by cumulative log-probability. Nodes are numbered in BFS
order, the root (the last committed token) being node 0; a chain is the tree of widths 1.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass
class LevelExpansion:
    """The next level of every request's tree: [B, w] each."""

    tokens: torch.Tensor         # int64 token ids
    parent_local: torch.Tensor   # int64 index of the parent within the previous level
    scores: torch.Tensor         # fp32 cumulative log-probabilities


def expand_level(logprobs: torch.Tensor, scores: torch.Tensor, width: int) -> LevelExpansion:
    """Global top-``width`` children of one level.

    Args:
        logprobs: [B, W, V] the draft's log-probabilities at the level's W nodes.
        scores: [B, W] the nodes' cumulative log-probabilities.
    """
    batch, nodes, vocab = logprobs.shape
    width = min(width, nodes * vocab)
    if _fused_topk(logprobs, width):
        from vllm_longspec_kernels.level_topk import beam_topk

        best, index = beam_topk(logprobs, scores, width)
    else:
        cumulative = (scores.unsqueeze(-1) + logprobs).reshape(batch, nodes * vocab)
        best, index = chunked_topk(cumulative, width)
    return LevelExpansion(tokens=index % vocab, parent_local=index // vocab, scores=best)


# Devices where `enable_fused_topk`'s self-check passed.
_FUSED_TOPK_DEVICES: set[torch.device] = set()
# The bitonic kernel: on an H100 a 64-node tree step at 32k costs 11.12 ms with it, 11.32 ms with
# torch.topk (benchmarks/results/h100-2026-12-05). LONGSPEC_BEAM_TOPK=torch keeps torch.topk.
DEFAULT_BEAM_TOPK = "triton"


def beam_topk_path() -> str:
    """`triton` or `torch`: LONGSPEC_BEAM_TOPK, else `DEFAULT_BEAM_TOPK`."""
    return os.environ.get("LONGSPEC_BEAM_TOPK", DEFAULT_BEAM_TOPK)


def enable_fused_topk(widths: tuple[int, ...], device: torch.device) -> bool:
    """Lets `expand_level` use the Triton top-k (`level_topk.beam_topk`) on a CUDA `device` once
    it has compiled and matched torch.topk there for these widths (`topk_check`), when
    `beam_topk_path` is `triton`. The drafter calls this when it loads, before CUDA graphs are
    captured."""
    if device.type != "cuda" or beam_topk_path() != "triton":
        return False
    if device.index is None:  # tensors report their index: cuda:0, not cuda
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _FUSED_TOPK_DEVICES:
        from .topk_check import fused_topk_works

        if not fused_topk_works(tuple(widths), device):
            return False
        _FUSED_TOPK_DEVICES.add(device)
    return True


def _fused_topk(logprobs: torch.Tensor, width: int) -> bool:
    """The Triton top-k where `enable_fused_topk` passed: the same children as the torch path;
    among exactly equal scores it keeps the lowest ids."""
    if logprobs.device not in _FUSED_TOPK_DEVICES or beam_topk_path() != "triton":
        return False
    from vllm_longspec_kernels.level_topk import beam_topk_supported

    return beam_topk_supported(logprobs, width)


# Longest chunk of `chunked_topk`: PyTorch's top-k runs one single-block kernel over many slices
# of up to a few thousand elements, but a multi-pass radix select (~13 launches) over few long
# slices -- the drafting's case, (16 nodes x 32k-150k vocabulary) per request.
_TOPK_CHUNK = 4096
_MIN_TOPK_CHUNK = 1024


@functools.lru_cache(maxsize=None)
def topk_chunk_length(length: int, k: int) -> int | None:
    """The largest divisor of `length` in [1024, 4096] and >= k, or None (no chunking)."""
    if length <= _TOPK_CHUNK:
        return None
    for chunk in range(_TOPK_CHUNK, max(_MIN_TOPK_CHUNK, k) - 1, -1):
        if length % chunk == 0:
            return chunk
    return None


def chunked_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(k, dim=-1)`` of [B, L] as two short top-ks: the top-k of each chunk of
    the row, then the top-k of those candidates (the row's top-k has at most k in any chunk, so
    the result is the same set; the order among exactly equal values may differ).

    Returns:
        values [B, k] (descending) and their indices [B, k] into the row (int64).
    """
    batch, length = values.shape
    chunk = topk_chunk_length(length, k)
    if chunk is None:
        return values.topk(k, dim=-1)
    local_best, local_index = values.view(batch, length // chunk, chunk).topk(k, dim=-1)
    best, pick = local_best.reshape(batch, -1).topk(k, dim=-1)  # pick in [0, chunks * k)
    local = local_index.reshape(batch, -1).gather(1, pick)
    return best, torch.div(pick, k, rounding_mode="floor") * chunk + local


def tree_node_offsets(widths: tuple[int, ...]) -> list[int]:
    """BFS index of the first node of each level: [1, 1 + w_1, ...] (node 0 is the root)."""
    offsets = [1]
    for width in widths:
        offsets.append(offsets[-1] + width)
    return offsets


def best_path(parents: torch.Tensor, last_level_start: int) -> torch.Tensor:
    """Nodes of the path to the best node of the deepest level (root excluded), [B, depth].

    Args:
        parents: [B, N+1] BFS parents (root -1).
        last_level_start: BFS index of the deepest level's first (best-scored) node.
    """
    batch = parents.shape[0]
    node = torch.full((batch,), last_level_start, dtype=torch.long, device=parents.device)
    path = []
    while True:
        path.append(node)
        node = parents.gather(1, node.unsqueeze(1)).squeeze(1)
        if bool((node <= 0).all()):
            break
    return torch.stack(path[::-1], dim=1)
