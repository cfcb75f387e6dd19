"""LongSpec's dynamic beam tree, batched over requests (no per-node Python loops).

Level 1 holds the root's top-``w_1`` tokens; level l+1 the global top-``w_{l+1}`` over
(nodes of level l) x (vocabulary) by cumulative log-probability. Nodes are numbered in BFS
order, the root (the last committed token) being node 0; a chain is the tree of widths 1.
"""

from __future__ import annotations

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
    cumulative = (scores.unsqueeze(-1) + logprobs).reshape(batch, nodes * vocab)
    width = min(width, nodes * vocab)
    best, index = cumulative.topk(width, dim=-1)
    return LevelExpansion(tokens=index % vocab, parent_local=index // vocab, scores=best)


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
