"""Model Runner V2 trees, host-free parts: per-slot tree records and the step fix-up (depth
positions, masks for uniform batches, plans for mixed ones) against the V1 runner's plan."""

from __future__ import annotations

import numpy as np
import torch

from vllm_longspec.engine.tree_device import ancestor_matrix, chain_masks
from vllm_longspec.engine.v2_tree import StepLayout, TreeSlots, level_depths, prepare_tree_step
from vllm_longspec.engine.verification import TreeRowCandidate, ancestor_masks, build_plan
from vllm_longspec.engine.verify_attention import FullGraphTreeMasks

from .test_tree_device import random_beam_parents

WIDTHS = (2, 3, 3)
N = 1 + sum(WIDTHS)
SLOTS = 6
CPU = torch.device("cpu")


def _recorded(rng, slots: list[int], ok: list[bool]) -> tuple[TreeSlots, np.ndarray, np.ndarray]:
    tree = TreeSlots(SLOTS, WIDTHS, CPU)
    parents = random_beam_parents(rng, len(slots), WIDTHS)
    tokens = rng.integers(0, 50, (len(slots), N - 1))
    handed = tree.record(torch.tensor(slots), torch.from_numpy(tokens),
                         torch.from_numpy(parents), torch.tensor(ok))
    return tree, parents, handed.numpy()


def test_level_depths():
    assert level_depths((2, 3)).tolist() == [0, 1, 1, 2, 2, 2]


def test_record_keeps_trees_and_turns_ineligible_rows_into_chains():
    rng = np.random.default_rng(0)
    tree, parents, handed = _recorded(rng, [4, 1], [True, False])
    words = tree.num_words
    assert np.array_equal(tree.parents[4].numpy(), parents[0])
    assert np.array_equal(tree.masks[4].numpy(), ancestor_masks(parents[:1], words))
    assert tree.position_shift[4].tolist() == (np.arange(N) - level_depths(WIDTHS)).tolist()
    # slot 1: a chain over the same N-1 drafts (best path, then its last token repeated)
    assert tree.parents[1].tolist() == list(range(-1, N - 1))
    assert torch.equal(tree.masks[1], chain_masks(N, words, CPU))
    assert tree.position_shift[1].tolist() == [0] * N
    assert len(set(handed[1, len(WIDTHS) - 1:].tolist())) == 1
    # untouched slots and the chain row hold chains
    for slot in (0, SLOTS):
        assert tree.parents[slot].tolist() == list(range(-1, N - 1))
    rows = tree.rows(torch.tensor([4]), torch.zeros(1, N, dtype=torch.long),
                     torch.ones(1, N, dtype=torch.bool), torch.arange(N)[None])
    assert torch.equal(rows.ancestors[0], ancestor_matrix(torch.from_numpy(parents[:1]), 3)[0])
    assert rows.depth[0].tolist() == level_depths(WIDTHS).tolist()


def _layout(counts: list[int], drafts: list[int], slots: list[int],
            seq_lens: list[int]) -> StepLayout:
    query_start = np.concatenate([[0], np.cumsum(counts)])
    return StepLayout(num_tokens=int(query_start[-1]), query_start=query_start,
                      num_drafts=np.array(drafts), slots=np.array(slots),
                      seq_len_bound=np.array(seq_lens),
                      req_ids=[f"r{i}" for i in range(len(slots))])


def _chain_positions(layout: StepLayout, seq_lens: list[int]) -> torch.Tensor:
    """vLLM's positions: each row's tokens at num_computed .. num_computed + n - 1."""
    out = []
    for r, n in enumerate(np.diff(layout.query_start)):
        start = seq_lens[r] - n
        out.extend(range(start, start + n))
    return torch.tensor(out + [0] * 5)  # padding stays untouched


def test_mixed_batch_plan_equals_the_v1_plan():
    rng = np.random.default_rng(1)
    tree, parents, _ = _recorded(rng, [3, 0], [True, True])
    # rows: slot 3 a full tree, a prefill chunk (slot 5), slot 0 a truncated tree (5 nodes)
    counts, drafts, slots, seq_lens = [N, 7, 5], [N - 1, 0, 4], [3, 5, 0], [40, 20, 33]
    layout = _layout(counts, drafts, slots, seq_lens)
    positions = _chain_positions(layout, seq_lens)
    before = positions.clone()
    plan = prepare_tree_step(layout, tree, positions, torch.tensor(seq_lens, dtype=torch.int32),
                             None)
    assert plan is not None
    candidates = [
        TreeRowCandidate(row=0, req_id="r0", query_start=0, num_scheduled=N,
                         num_computed=40 - N, parents=parents[0], tokens=np.zeros(N)),
        TreeRowCandidate(row=2, req_id="r2", query_start=N + 7, num_scheduled=5,
                         num_computed=33 - 5, parents=parents[1], tokens=np.zeros(5))]
    v1, pos_index, pos_values = build_plan(candidates, np.array(drafts), layout.num_tokens, CPU)
    expected = before.clone()
    expected[pos_index] = pos_values
    assert torch.equal(positions, expected)
    for name in ("rows", "token_index", "cu_seqlens", "prefix_lens", "parents"):
        assert torch.equal(getattr(plan, name), getattr(v1, name)), name
    assert plan.max_nodes == N and plan.num_actual_tokens == layout.num_tokens
    assert plan.max_prefix_len >= 40 - N and plan.token_slice is None
    words = tree.num_words
    expected_masks = np.concatenate([ancestor_masks(parents[:1], words),
                                     ancestor_masks(parents[1:2, :5], words)])
    assert np.array_equal(plan.tree_mask.numpy(), expected_masks)


def test_uniform_batch_fills_the_full_graph_masks_with_trees_and_chains():
    rng = np.random.default_rng(2)
    tree, parents, _ = _recorded(rng, [2, 4], [True, False])
    words = tree.num_words
    graphs = FullGraphTreeMasks(masks=torch.full((5 * N, words), 7, dtype=torch.int32),
                                query_len=N, max_model_len=100)
    # three rows of N tokens: slot 2 (tree), slot 4 (chain row), slot 1 (a prefill chunk)
    counts, drafts, slots, seq_lens = [N, N, N], [N - 1, N - 1, 0], [2, 4, 1], [50, 60, 30]
    layout = _layout(counts, drafts, slots, seq_lens)
    positions = _chain_positions(layout, seq_lens)
    before = positions.clone()
    plan = prepare_tree_step(layout, tree, positions, torch.tensor(seq_lens, dtype=torch.int32),
                             graphs)
    assert plan is None
    chain = chain_masks(N, words, CPU)
    assert np.array_equal(graphs.masks[:N].numpy(), ancestor_masks(parents[:1], words))
    assert torch.equal(graphs.masks[N:2 * N], chain)
    assert torch.equal(graphs.masks[2 * N:3 * N], chain)
    assert bool((graphs.masks[3 * N:] == 7).all())  # beyond the batch: untouched
    shift = torch.from_numpy(np.arange(N) - level_depths(WIDTHS))
    assert torch.equal(positions[:N], before[:N] - shift)
    assert torch.equal(positions[N:], before[N:])


def test_steps_without_trees_leave_everything_alone():
    tree = TreeSlots(SLOTS, WIDTHS, CPU)
    layout = _layout([9, 1], [0, 0], [0, 1], [9, 30])
    positions = torch.arange(15)
    assert prepare_tree_step(layout, tree, positions, torch.tensor([9, 30]), None) is None
    assert torch.equal(positions, torch.arange(15))
