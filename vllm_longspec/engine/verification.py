"""The tree-verification plan of one engine step: which rows of the batch verify a token tree.

vLLM's V1 runner verifies chains: request r's input is ``[root, d_1, ..., d_n]`` at positions
``p .. p+n`` in slots ``p .. p+n``, causal attention, and the scheduler keeps the first ``a+1``
tokens' K/V. A LongSpec tree row keeps the slots (the BFS-flattened tree occupies slots
``p .. p+n``) but changes three things, all driven by this plan:

* positions: node i is at ``p + depth(i)`` (RoPE as if on its own path);
* attention: node i sees the committed prefix ``[0, p)`` and its ancestors in the tree (and
  itself) -- see `verify_attention`;
* acceptance: a path of the tree, not a prefix of the list -- see `tree_acceptance`; afterwards the
  accepted path's K/V move to slots ``p+1 .. p+a`` (compaction), so the scheduler's chain
  bookkeeping (``num_computed_tokens -= rejected``) stays true.

Any row not in the plan is verified as vLLM verifies it (a chain, or plain decoding), which is
always lossless; so a row whose tree cannot be honoured is simply left out.

The plan lives for one step (set after ``_prepare_inputs``, cleared after sampling) in this
module: the attention layers and the sampler of the same worker process read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TreeVerificationPlan:
    """Tree rows of one step, in batch order.

    Attributes:
        rows: [R] batch row of each tree request (int64, on the device).
        req_ids: R request ids.
        token_index: [T] index of every tree token in the step's flattened input, row-major
            (int64, device). T = sum of (nodes incl. root) over the tree rows.
        cu_seqlens: [R+1] int32 (device): tree tokens of row j are ``cu_seqlens[j]:cu_seqlens[j+1]``
            of ``token_index``.
        prefix_lens: [R] int32 (device): committed tokens before the root (the root's position).
        parents: [T] int64 (device): local parent of each node, -1 for the root.
        parents_cpu: R numpy arrays of the same.
        tokens_cpu: R numpy arrays: node tokens, the root's included (node 0).
        logits_start: R ints: the row's first logits row in the step's logits (root's logits).
        num_actual_tokens: total scheduled tokens of the step (a consistency check).
        max_nodes: the largest tree (nodes incl. root).
        max_prefix_len: the largest prefix.
    """

    rows: torch.Tensor
    req_ids: list[str]
    token_index: torch.Tensor
    cu_seqlens: torch.Tensor
    prefix_lens: torch.Tensor
    parents: torch.Tensor
    parents_cpu: list[np.ndarray]
    tokens_cpu: list[np.ndarray]
    logits_start: list[int]
    num_actual_tokens: int
    max_nodes: int
    max_prefix_len: int
    # The tree tokens as one slice of the step's input when they are contiguous (a batch whose
    # tree rows are adjacent, e.g. every batch of tree rows only): gathers become views.
    token_slice: slice | None = None
    tree_mask: torch.Tensor | None = None  # [T, W] int32 ancestor bitmask, built on first use
    block_table: torch.Tensor | None = None  # [R, max_blocks] int32, built on first use

    @property
    def covers_all_tokens(self) -> bool:
        """Every token of the step is a tree token (no other row to attend for)."""
        return self.token_slice is not None and self.token_slice.start == 0 and \
            self.token_slice.stop == self.num_actual_tokens

    @property
    def num_rows(self) -> int:
        return len(self.req_ids)


def node_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of each node of a BFS-ordered tree (parents[i] < i, root -1)."""
    depth = np.zeros(len(parents), dtype=np.int64)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return depth


def ancestor_masks(parents: np.ndarray, num_words: int) -> np.ndarray:
    """Packed ancestor bitmasks of equally sized BFS trees, built on the host.

    The format of ``vllm_longspec_kernels.tree_mask_from_parents`` (bit j of row i: node j is
    node i or one of its ancestors), without its ~``log2(n)`` device launches.

    Args:
        parents: [R, n] int, local parents (root -1, ``parents[r, i] < i``).
        num_words: int32 words per row (>= ceil(n / 32)).
    Returns:
        [R * n, num_words] int32.
    """
    rows, n = parents.shape
    seen = np.zeros((rows, n, 32 * num_words), dtype=bool)
    seen[:, np.arange(n), np.arange(n)] = True
    every_row = np.arange(rows)
    for node in range(1, n):  # BFS order: a parent's row is complete before its children's
        seen[every_row, node, :n] |= seen[every_row, parents[:, node], :n]
    packed = np.packbits(seen, axis=-1, bitorder="little")  # [R, n, 4 * W] bytes
    return np.ascontiguousarray(packed).view("<i4").reshape(rows * n, num_words)


@dataclass
class TreeRowCandidate:
    """A batch row that scheduled a tree: what the plan builder needs to know about it."""

    row: int
    req_id: str
    query_start: int          # first token of the row in the step's input
    num_scheduled: int        # tokens scheduled for the row this step
    num_computed: int         # committed tokens with K/V in the cache (= root position)
    parents: np.ndarray       # the drafted tree's parents, root included (len >= num_scheduled)
    tokens: np.ndarray        # node tokens incl. the root (as scheduled this step)


def build_plan(candidates: list[TreeRowCandidate], num_draft_per_row: np.ndarray,
               num_actual_tokens: int, device: torch.device
               ) -> tuple[TreeVerificationPlan | None, torch.Tensor | None, torch.Tensor | None]:
    """Builds the plan and the position fix-ups for the tree rows.

    Args:
        candidates: rows whose scheduled drafts are (a BFS prefix of) a LongSpec tree.
        num_draft_per_row: [num_reqs] draft tokens scheduled per batch row (0 for none); the
            step's logits hold ``num_draft + 1`` rows per request, in batch order.
        num_actual_tokens: total tokens scheduled this step.
    Returns:
        (plan, position_index, position_values): the plan (None without tree rows) and the
        positions to overwrite (indices into the runner's positions buffer, new values).
    """
    if not candidates:
        return None, None, None
    logits_offsets = np.concatenate([[0], np.cumsum(num_draft_per_row + 1)])
    token_index, parents_all, pos_index, pos_values = [], [], [], []
    cu, prefix_lens, parents_cpu, tokens_cpu, logits_start = [0], [], [], [], []
    for cand in candidates:
        n = cand.num_scheduled
        parents = np.asarray(cand.parents[:n], dtype=np.int64)
        depth = node_depths(parents)
        idx = np.arange(cand.query_start, cand.query_start + n, dtype=np.int64)
        token_index.append(idx)
        parents_all.append(parents)
        moved = depth != np.arange(n)
        pos_index.append(idx[moved])
        pos_values.append(cand.num_computed + depth[moved])
        cu.append(cu[-1] + n)
        prefix_lens.append(cand.num_computed)
        parents_cpu.append(parents)
        tokens_cpu.append(np.asarray(cand.tokens[:n], dtype=np.int64))
        logits_start.append(int(logits_offsets[cand.row]))

    def to_dev(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    flat_index = np.concatenate(token_index)
    contiguous = bool(np.all(np.diff(flat_index) == 1))
    plan = TreeVerificationPlan(
        rows=to_dev(np.array([c.row for c in candidates]), torch.int64),
        req_ids=[c.req_id for c in candidates],
        token_index=to_dev(flat_index, torch.int64),
        cu_seqlens=to_dev(np.array(cu), torch.int32),
        prefix_lens=to_dev(np.array(prefix_lens), torch.int32),
        parents=to_dev(np.concatenate(parents_all), torch.int64),
        parents_cpu=parents_cpu,
        tokens_cpu=tokens_cpu,
        logits_start=logits_start,
        num_actual_tokens=num_actual_tokens,
        max_nodes=max(c.num_scheduled for c in candidates),
        max_prefix_len=max(prefix_lens),
        token_slice=(slice(int(flat_index[0]), int(flat_index[-1]) + 1) if contiguous else None),
    )
    return (plan, to_dev(np.concatenate(pos_index), torch.int64),
            to_dev(np.concatenate(pos_values), torch.int64))


_ACTIVE: TreeVerificationPlan | None = None


def set_active_plan(plan: TreeVerificationPlan | None) -> None:
    global _ACTIVE
    _ACTIVE = plan


def active_plan() -> TreeVerificationPlan | None:
    return _ACTIVE
