"""One-launch tree bookkeeping (`tree_bookkeeping`) against its torch references: Model Runner
V2's `TreeSlots.record` and `accept_greedy_device`. Beam trees of LongSpec's shapes (one word of
mask bits and three), chain rows beside tree rows, BFS-prefix verification, poisoned outputs."""

import sys

import pytest
import torch

import vllm_longspec_kernels.tree_bookkeeping as bookkeeping
from vllm_longspec.engine.beam_tree import tree_node_offsets
from vllm_longspec.engine.bookkeeping_check import (fused_bookkeeping_works,
                                                     random_beam_parents)
from vllm_longspec.engine.tree_device import accept_greedy_device
from vllm_longspec.engine.v2_tree import TreeSlots
from vllm_longspec_kernels.tree_bookkeeping import accept_greedy_trees, record_trees

SHAPES = [(4, 16, 16, 16, 16), (4, 16, 16, 16, 11), (2, 3), (1, 1, 1, 1), (3,)]
MAX_SLOTS = 9


def recorded(slots_obj: TreeSlots) -> tuple[torch.Tensor, ...]:
    return slots_obj.parents.clone(), slots_obj.masks.clone(), slots_obj.position_shift.clone()


@pytest.mark.parametrize("widths", SHAPES)
def test_record_trees_equals_tree_slots_record(kit, widths):
    gen = torch.Generator().manual_seed(kit.seed)
    device = kit.device
    batch = 5
    reference = TreeSlots(MAX_SLOTS, widths, torch.device(device))
    fused = TreeSlots(MAX_SLOTS, widths, torch.device(device))
    for _ in range(2):  # a second round overwrites slots that held trees or chains
        parents = random_beam_parents(gen, batch, widths).to(device)
        n = parents.shape[1]
        tokens = torch.randint(0, 50_000, (batch, n - 1), generator=gen).to(device)
        slots = torch.randperm(MAX_SLOTS, generator=gen)[:batch].to(device)
        tree_ok = (torch.rand(batch, generator=gen) < 0.6).to(device)
        tree_ok[0], tree_ok[1] = True, False
        expected = reference.record(slots, tokens, parents, tree_ok)
        got = record_trees(slots, tokens, parents, tree_ok, fused.parents, fused.masks,
                           fused.position_shift, fused.chain_masks, fused.tree_shift,
                           fused.depth, fused.first_leaf)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for a, b in zip(recorded(fused), recorded(reference)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_record_trees_leaves_other_slots_alone(kit):
    widths = (4, 16, 16, 16, 11)
    gen = torch.Generator().manual_seed(kit.seed)
    slots_obj = TreeSlots(MAX_SLOTS, widths, torch.device(kit.device))
    poison = -7
    slots_obj.parents.fill_(poison)
    slots_obj.masks.fill_(poison)
    slots_obj.position_shift.fill_(poison)
    parents = random_beam_parents(gen, 2, widths).to(kit.device)
    tokens = torch.randint(0, 100, (2, parents.shape[1] - 1), generator=gen).to(kit.device)
    slots = torch.tensor([3, 7], device=kit.device)
    record_trees(slots, tokens, parents, torch.tensor([True, False], device=kit.device),
                 slots_obj.parents, slots_obj.masks, slots_obj.position_shift,
                 slots_obj.chain_masks, slots_obj.tree_shift, slots_obj.depth,
                 slots_obj.first_leaf)
    others = [s for s in range(MAX_SLOTS + 1) if s not in (3, 7)]
    assert (slots_obj.parents[others] == poison).all()
    assert (slots_obj.masks[others] == poison).all()
    assert (slots_obj.parents[[3, 7]] != poison).all()
    assert (slots_obj.masks[7] == slots_obj.chain_masks).all()


def _acceptance_case(gen, widths, batch, device):
    """Recorded trees, the step's node tokens and the target's argmax, drawn from a small
    vocabulary so that paths of every length get accepted."""
    slots_obj = TreeSlots(MAX_SLOTS, widths, torch.device(device))
    n = slots_obj.num_nodes
    parents = random_beam_parents(gen, batch, widths)
    vocab = 3
    drafted = torch.randint(0, vocab, (batch, n - 1), generator=gen)
    slots = torch.randperm(MAX_SLOTS, generator=gen)[:batch]
    tree_ok = torch.rand(batch, generator=gen) < 0.7
    tree_ok[0] = True
    scheduled = slots_obj.record(slots.to(device), drafted.to(device), parents.to(device),
                                 tree_ok.to(device)).cpu()
    roots = torch.randint(0, vocab, (batch, 1), generator=gen)
    tokens = torch.cat([roots, scheduled], dim=1)
    # a BFS prefix of each row is verified (the scheduler may trim a tree)
    num_valid = torch.randint(1, n + 1, (batch,), generator=gen)
    num_valid[0] = n
    valid = torch.arange(n).unsqueeze(0) < num_valid.unsqueeze(1)
    logits_rows = (torch.cumsum(num_valid, 0) - num_valid).unsqueeze(1) + torch.arange(n)
    logits_rows = logits_rows.clamp(max=int(num_valid.sum()) - 1)
    argmax = torch.randint(0, vocab, (int(num_valid.sum()),), generator=gen)
    # row 0 (a whole tree): the target agrees with the path to its first deepest node
    node = tree_node_offsets(widths)[-2]
    while node > 0:
        parent = int(parents[0, node])
        argmax[logits_rows[0, parent]] = tokens[0, node]
        node = parent
    to = lambda t: t.to(device)  # noqa: E731
    return slots_obj, to(slots), to(tokens), to(valid), to(logits_rows), to(argmax)


@pytest.mark.parametrize("widths", SHAPES)
def test_accept_greedy_trees_equals_accept_greedy_device(kit, widths):
    gen = torch.Generator().manual_seed(kit.seed)
    lengths = []
    for _ in range(3):
        slots_obj, slots, tokens, valid, logits_rows, argmax = _acceptance_case(
            gen, widths, 6, kit.device)
        expected = accept_greedy_device(slots_obj.rows(slots, tokens, valid, logits_rows), argmax)
        got_tokens, got_num, got_path = accept_greedy_trees(
            slots, slots_obj.parents, tokens, valid, logits_rows, argmax)
        torch.testing.assert_close(got_num, expected.num_sampled, rtol=0, atol=0)
        torch.testing.assert_close(got_tokens, expected.tokens, rtol=0, atol=0)
        torch.testing.assert_close(got_path, expected.path, rtol=0, atol=0)
        lengths += expected.num_sampled.tolist()
    assert max(lengths) >= len(widths) + 1, lengths  # row 0 accepts its whole depth
    assert min(lengths) == 1 or len(set(lengths)) > 1, lengths


def test_accept_greedy_trees_full_acceptance_of_the_best_path(kit):
    """The target agrees with every draft token: the first deepest node wins (BFS order)."""
    widths = (4, 16, 16, 16, 11)
    slots_obj = TreeSlots(MAX_SLOTS, widths, torch.device(kit.device))
    n = slots_obj.num_nodes
    gen = torch.Generator().manual_seed(kit.seed)
    parents = random_beam_parents(gen, 1, widths).to(kit.device)
    drafted = torch.full((1, n - 1), 5, device=kit.device)
    slots = torch.tensor([2], device=kit.device)
    slots_obj.record(slots, drafted, parents, torch.tensor([True], device=kit.device))
    tokens = torch.cat([torch.tensor([[5]], device=kit.device), drafted], dim=1)
    valid = torch.ones(1, n, dtype=torch.bool, device=kit.device)
    logits_rows = torch.arange(n, device=kit.device).unsqueeze(0)
    argmax = torch.full((n,), 5, device=kit.device)
    out, num, path = accept_greedy_trees(slots, slots_obj.parents, tokens, valid, logits_rows,
                                         argmax)
    first_leaf = tree_node_offsets(widths)[-2]
    assert num.tolist() == [len(widths) + 1]
    assert path[0, len(widths)].item() == first_leaf
    assert out[0, :len(widths) + 1].tolist() == [5] * (len(widths) + 1)
    assert (out[0, len(widths) + 1:] == -1).all() and (path[0, len(widths) + 1:] == -1).all()


@pytest.fixture
def kernels_here(monkeypatch):
    """Engine code imports the kernels when it runs: hand it this test's (interpreted) copy."""
    monkeypatch.setitem(sys.modules, bookkeeping.__name__, bookkeeping)
    return bookkeeping


@pytest.mark.parametrize("widths", [(4, 16, 16, 16, 11), (2, 2)])
def test_tree_slots_one_launch_paths_equal_the_torch_paths(kit, kernels_here, widths):
    def step(fused: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(kit.seed)
        slots_obj, slots, tokens, valid, logits_rows, argmax = _acceptance_case(
            gen, widths, 4, kit.device)
        slots_obj.fused = fused
        accepted = slots_obj.accept_greedy(slots, tokens, valid, logits_rows, argmax)
        # then the next step's trees are recorded over the same slots
        parents = random_beam_parents(gen, 4, widths).to(kit.device)
        drafted = torch.randint(0, 9, (4, parents.shape[1] - 1), generator=gen).to(kit.device)
        scheduled = slots_obj.record(slots, drafted, parents,
                                     torch.tensor([True, False, True, True], device=kit.device))
        return [accepted.tokens, accepted.num_sampled, accepted.path, scheduled,
                slots_obj.parents, slots_obj.masks, slots_obj.position_shift]

    for got, want in zip(step(fused=True), step(fused=False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_self_check_takes_the_kernels_where_they_agree(kit, kernels_here):
    assert fused_bookkeeping_works((4, 16, 16, 16, 11), torch.device(kit.device))


def test_self_check_refuses_kernels_that_disagree_or_fail(kit, kernels_here, monkeypatch):
    original = bookkeeping.accept_greedy_trees

    def off_by_one(*args):
        out, num_sampled, path = original(*args)
        return out, num_sampled + 1, path

    monkeypatch.setattr(bookkeeping, "accept_greedy_trees", off_by_one)
    assert not fused_bookkeeping_works((2, 2), torch.device(kit.device))

    def fails(*args):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(bookkeeping, "accept_greedy_trees", original)
    monkeypatch.setattr(bookkeeping, "record_trees", fails)
    assert not fused_bookkeeping_works((2, 2), torch.device(kit.device))
