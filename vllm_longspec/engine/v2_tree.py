"""Token trees on vLLM's Model Runner V2: the verification side, without host syncs.

V2 runs with asynchronous scheduling: the host prepares step N+1 while the GPU still runs step
N, so nothing about step N's drafts (which live on the GPU) may be read back. A tree step is:

1. the speculator drafts every request's tree after step N and records it by request *slot*
   (`TreeSlots.record`): its parents, packed ancestor masks and position shifts;
2. vLLM lays step N+1 out as chains (slots, positions ``p .. p+n``); `prepare_tree_step` then
   moves each tree row's nodes to positions ``p + depth`` and gathers the rows' masks from the
   slots' records -- all device work, sized from host arrays vLLM already holds;
3. the target attends the tree rows with hybrid tree attention (`verify_attention`): a uniform
   batch (every row ``N`` tokens, vLLM's full CUDA graphs) reads the masks from the persistent
   `FullGraphTreeMasks` buffer, a mixed batch gets a `TreeVerificationPlan`;
4. acceptance (`tree_device`) and KV compaction run on the device as well.

A request whose sampling a tree cannot honour (penalties, bad words, logprobs, structured
output) verifies its tree's best path as a chain over the same N-1 drafts: a chain is a tree
whose node i sits at depth i, so every step stays uniform.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .beam_tree import tree_node_offsets
from .tree_device import (DeviceTreeAcceptance, TreeRows, accept_greedy_device, ancestor_matrix,
                          best_path_chain, chain_masks, pack_masks, unpack_masks)
from .verification import TreeVerificationPlan
from .verify_attention import FullGraphTreeMasks


def level_depths(widths: tuple[int, ...]) -> np.ndarray:
    """Depth of each BFS node of a beam tree with these level widths (root included)."""
    return np.concatenate([[0]] + [np.full(w, level + 1) for level, w in enumerate(widths)])


class TreeSlots:
    """What each request slot verifies at its next step (device buffers, one row per slot and
    one extra row, `chain_row`, holding a chain for rows that verify no tree).

    Args:
        max_slots: the runner's request slots (``max_num_seqs``).
        widths: the tree's level widths (N = 1 + sum nodes per tree).
        device: where the buffers live.
    """

    def __init__(self, max_slots: int, widths: tuple[int, ...], device: torch.device):
        from vllm_longspec_kernels import tree_mask_num_words

        self.widths = tuple(widths)
        self.depth = len(self.widths)
        self.num_nodes = 1 + sum(self.widths)
        self.num_words = tree_mask_num_words(self.num_nodes)
        self.first_leaf = tree_node_offsets(self.widths)[-2]
        self.chain_row = max_slots
        n, rows = self.num_nodes, max_slots + 1
        chain_parents = torch.arange(-1, n - 1, device=device)
        self.chain_parents = chain_parents
        self.chain_masks = chain_masks(n, self.num_words, device)                # [N, W]
        self.parents = chain_parents.repeat(rows, 1)                             # [S+1, N]
        self.masks = self.chain_masks.repeat(rows, 1, 1)                         # [S+1, N, W]
        self.position_shift = torch.zeros(rows, n, dtype=torch.long, device=device)
        # A tree row's node i sits at position root + depth(i): i - depth(i) below the chain's.
        self.tree_shift = torch.from_numpy(
            np.arange(n) - level_depths(self.widths)).to(device)
        # One launch each for recording and greedy acceptance (`tree_bookkeeping`) on CUDA,
        # where the host's launches of the torch versions left the GPU idle.
        # LONGSPEC_TREE_BOOKKEEPING=torch keeps the torch versions (A/B measurements).
        if device.type == "cuda" and os.environ.get("LONGSPEC_TREE_BOOKKEEPING") != "torch":
            from .bookkeeping_check import fused_bookkeeping_works

            self.fused = fused_bookkeeping_works(self.widths, device)
        else:
            self.fused = False

    def record(self, slots: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
               tree_ok: torch.Tensor) -> torch.Tensor:
        """Records each request's tree for its next verification.

        Args:
            slots: [B] int64 request slots.
            tokens: [B, N-1] int64 drafted nodes (BFS, root excluded).
            parents: [B, N] int64 their parents (root -1).
            tree_ok: [B] bool rows that verify the tree (the others: its best path as a chain).
        Returns:
            [B, N-1] the draft tokens to schedule (chain rows: the best path, then filler).
        """
        if self.fused:
            from vllm_longspec_kernels.tree_bookkeeping import record_trees

            return record_trees(slots, tokens, parents, tree_ok, self.parents, self.masks,
                                self.position_shift, self.chain_masks, self.tree_shift,
                                self.depth, self.first_leaf)
        chain_tokens, chain_parents = best_path_chain(tokens, parents, self.first_leaf,
                                                      self.depth)
        ok = tree_ok.unsqueeze(1)
        tree_masks = pack_masks(ancestor_matrix(parents, self.depth), self.num_words)
        self.parents[slots] = torch.where(ok, parents, chain_parents)
        self.masks[slots] = torch.where(ok.unsqueeze(2), tree_masks, self.chain_masks)
        self.position_shift[slots] = torch.where(ok, self.tree_shift, 0)
        return torch.where(ok, tokens, chain_tokens)

    def rows(self, slots: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
             logits_rows: torch.Tensor) -> TreeRows:
        """The recorded trees of a step's rows, for acceptance (`tree_device`).

        Args:
            slots: [R] int64; tokens, valid, logits_rows: [R, N] (see `TreeRows`).
        """
        return TreeRows(tokens=tokens, parents=self.parents[slots],
                        ancestors=unpack_masks(self.masks[slots], self.num_nodes),
                        valid=valid, logits_rows=logits_rows)

    def accept_greedy(self, slots: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
                      logits_rows: torch.Tensor, argmax: torch.Tensor) -> DeviceTreeAcceptance:
        """Greedy acceptance of a step's rows (`accept_greedy_device`), in one launch on CUDA.

        Args:
            slots: [R] int64; tokens, valid, logits_rows: [R, N] (see `TreeRows`).
            argmax: [L] int64 the target's argmax at every logits row of the step.
        """
        if not self.fused:
            return accept_greedy_device(self.rows(slots, tokens, valid, logits_rows), argmax)
        from vllm_longspec_kernels.tree_bookkeeping import accept_greedy_trees

        out, num_sampled, path = accept_greedy_trees(slots, self.parents, tokens, valid,
                                                     logits_rows, argmax)
        return DeviceTreeAcceptance(tokens=out, num_sampled=num_sampled, path=path)


@dataclass
class StepLayout:
    """A V2 step as the host knows it before the GPU runs it (no device reads).

    Attributes:
        num_tokens: scheduled tokens of the step (unpadded).
        query_start: [R+1] int first token of each row.
        num_drafts: [R] int draft tokens scheduled per row (0: no drafts).
        slots: [R] int request slot of each row.
        seq_len_bound: [R] int upper bound of each row's length after the step.
        req_ids: R request ids.
    """

    num_tokens: int
    query_start: np.ndarray
    num_drafts: np.ndarray
    slots: np.ndarray
    seq_len_bound: np.ndarray
    req_ids: list[str]

    @property
    def num_rows(self) -> int:
        return len(self.slots)

    def is_uniform(self, query_len: int) -> bool:
        """Every row scheduled exactly `query_len` tokens (vLLM's full-graph decode batches)."""
        lens = np.diff(self.query_start[:self.num_rows + 1])
        return bool(self.num_rows > 0 and np.all(lens == query_len))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":  # a fresh pinned copy: safe to reuse nothing while in flight
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def prepare_tree_step(layout: StepLayout, slots: TreeSlots, positions: torch.Tensor,
                      seq_lens: torch.Tensor, full_graph_masks: FullGraphTreeMasks | None,
                      ) -> TreeVerificationPlan | None:
    """Turns the chain layout vLLM built into tree verification (device work only).

    Rows with drafts verify what their slots recorded: their nodes move to depth positions
    (``positions`` is vLLM's input buffer, after the slot mapping was computed from the chain
    positions), and their masks reach the attention: in `full_graph_masks` for a uniform batch
    (every other row there gets a chain mask), in the returned plan otherwise.

    Args:
        positions: [>= num_tokens] int64 vLLM's positions (modified in place).
        seq_lens: [>= R] int32 the rows' lengths after the step (device).
    Returns:
        the plan for a non-uniform batch with tree rows; None otherwise.
    """
    n = slots.num_nodes
    rows = np.flatnonzero(layout.num_drafts > 0)
    uniform = layout.is_uniform(n) and full_graph_masks is not None
    if rows.size == 0 and not uniform:
        return None
    device = positions.device
    counts = layout.num_drafts[rows].astype(np.int64) + 1
    starts = layout.query_start[rows].astype(np.int64)
    # each tree token's index within its row (one vectorised pass, no per-row loop)
    row_start = np.repeat(np.cumsum(counts) - counts, counts)
    local = np.arange(int(counts.sum())) - row_start
    token_index = np.repeat(starts, counts) + local
    source = np.repeat(layout.slots[rows].astype(np.int64) * n, counts) + local
    if uniform:
        # Every token of the batch gets a mask row: its slot's, or the chain's.
        full_source = slots.chain_row * n + np.arange(layout.num_tokens) % n
        full_source[token_index] = source
        source_dev = _to_device(full_source, device)
        assert full_graph_masks is not None
        full_graph_masks.masks[:layout.num_tokens] = \
            slots.masks.view(-1, slots.num_words)[source_dev]
        positions[:layout.num_tokens] -= slots.position_shift.view(-1)[source_dev]
        return None
    token_dev = _to_device(token_index, device)
    source_dev = _to_device(source, device)
    positions[token_dev] -= slots.position_shift.view(-1)[source_dev]
    rows_dev = _to_device(rows.astype(np.int64), device)
    counts_dev = _to_device(counts, device)
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    contiguous = bool(token_index.size and np.all(np.diff(token_index) == 1))
    return TreeVerificationPlan(
        rows=rows_dev, req_ids=[layout.req_ids[r] for r in rows], token_index=token_dev,
        cu_seqlens=_to_device(cu, device),
        prefix_lens=(seq_lens[rows_dev].long() - counts_dev).to(torch.int32),
        parents=slots.parents.view(-1)[source_dev], parents_cpu=[], tokens_cpu=[],
        logits_start=[], num_actual_tokens=layout.num_tokens,
        max_nodes=int(counts.max()), max_prefix_len=int(layout.seq_len_bound[rows].max()),
        token_slice=(slice(int(token_index[0]), int(token_index[-1]) + 1) if contiguous
                     else None),
        tree_mask=slots.masks.view(-1, slots.num_words)[source_dev])
