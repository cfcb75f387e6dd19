"""Device-side tree bookkeeping and acceptance (Model Runner V2's trees), against the host
reference (`tree_acceptance`, `verification`) and, for sampling, against the target's
distribution (statistically)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_longspec.engine.beam_tree import best_path, tree_node_offsets
from vllm_longspec.engine.tree_acceptance import accept_greedy
from vllm_longspec.engine.tree_device import (TreeRows, accept_greedy_device,
                                              accept_sampled_device, ancestor_matrix,
                                              best_path_chain, chain_masks, compaction_pairs,
                                              hashed_uniform, pack_masks, select_rows,
                                              unpack_masks)
from vllm_longspec.engine.verification import ancestor_masks

WIDTHS = (2, 3, 3)
N = 1 + sum(WIDTHS)
DEPTH = len(WIDTHS)


def random_beam_parents(rng: np.random.Generator, batch: int, widths=WIDTHS) -> np.ndarray:
    """BFS parents of beam trees: each level's nodes hang under nodes of the level above."""
    starts = [0] + tree_node_offsets(widths)  # BFS index of each level's first node
    parents = np.full((batch, 1 + sum(widths)), -1, dtype=np.int64)
    for level, width in enumerate(widths):
        lo, hi = starts[level], starts[level + 1]  # the level above
        for b in range(batch):
            parents[b, hi:hi + width] = np.sort(rng.integers(lo, hi, width))
    assert np.all(parents[:, 1:] < np.arange(1, parents.shape[1]))
    return parents


def rows_for(tokens: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor | None = None,
             logits_rows: torch.Tensor | None = None) -> TreeRows:
    r, n = tokens.shape
    return TreeRows(tokens=tokens, parents=parents,
                    ancestors=ancestor_matrix(parents, n - 1),
                    valid=torch.ones(r, n, dtype=torch.bool) if valid is None else valid,
                    logits_rows=(torch.arange(r * n).view(r, n) if logits_rows is None
                                 else logits_rows))


def test_packed_masks_equal_the_host_masks_and_unpack_back():
    rng = np.random.default_rng(0)
    parents = random_beam_parents(rng, 5)
    words = 2  # more words than needed: unused bits stay zero
    packed = pack_masks(ancestor_matrix(torch.from_numpy(parents), DEPTH), words)
    expected = ancestor_masks(parents, words).reshape(5, N, words)
    assert packed.dtype == torch.int32
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_masks(packed, N), ancestor_matrix(torch.from_numpy(parents), DEPTH))


def test_sign_bit_of_a_full_word():
    n = 40  # a chain: row 31 sets bit 31 of word 0
    masks = chain_masks(n, 2, torch.device("cpu"))
    parents = np.arange(-1, n - 1)[None]
    assert np.array_equal(masks.numpy(), ancestor_masks(parents, 2))
    assert masks[31, 0].item() == -1 and masks[39, 1].item() == (1 << 8) - 1


def test_best_path_chain_follows_the_first_deepest_node():
    rng = np.random.default_rng(1)
    parents = torch.from_numpy(random_beam_parents(rng, 4))
    tokens = torch.from_numpy(rng.integers(0, 100, (4, N - 1)))
    first_leaf = tree_node_offsets(WIDTHS)[-2]
    chain_tokens, chain_parents = best_path_chain(tokens, parents, first_leaf, DEPTH)
    path = best_path(parents, first_leaf)                      # [B, DEPTH] host reference
    expected = tokens.gather(1, path - 1)
    assert torch.equal(chain_tokens[:, :DEPTH], expected)
    assert torch.equal(chain_tokens[:, DEPTH:], expected[:, -1:].expand(4, N - 1 - DEPTH))
    assert chain_parents.tolist() == [list(range(-1, N - 1))] * 4


@pytest.mark.parametrize("seed", range(6))
def test_greedy_acceptance_equals_the_host_walk(seed):
    rng = np.random.default_rng(seed)
    batch, vocab = 16, 5  # a tiny vocabulary: long accepted paths happen often
    parents = random_beam_parents(rng, batch)
    tokens = rng.integers(0, vocab, (batch, N))
    for b in range(batch):  # siblings hold distinct tokens (a beam tree's do)
        for p in set(parents[b, 1:]):
            kids = np.flatnonzero(parents[b] == p)
            tokens[b, kids] = rng.permutation(vocab)[:len(kids)]
    argmax = rng.integers(0, vocab, (batch, N))
    for b in range(0, batch, 2):  # half the rows: the target agrees with some child everywhere
        for v in range(N):
            kids = np.flatnonzero(parents[b] == v)
            if kids.size:
                argmax[b, v] = tokens[b, rng.choice(kids)]
    counts = rng.integers(1, N + 1, batch)  # BFS prefixes verified (truncated rows)
    counts[:8] = N
    valid = np.arange(N)[None] < counts[:, None]
    result = accept_greedy_device(
        rows_for(torch.from_numpy(tokens), torch.from_numpy(parents),
                 torch.from_numpy(valid)), torch.from_numpy(argmax).view(-1))
    lengths = []
    for b in range(batch):
        n = counts[b]
        host = accept_greedy(argmax[b, :n], tokens[b, :n], parents[b, :n])
        got = result.tokens[b].tolist()
        assert got[:len(host.tokens)] == host.tokens
        assert all(t == -1 for t in got[len(host.tokens):])
        assert result.num_sampled[b].item() == len(host.tokens)
        assert result.path[b].tolist()[:len(host.tokens)] == [0] + host.nodes
        lengths.append(len(host.nodes))
    assert max(lengths) >= 2  # the test exercised deep paths


def test_greedy_acceptance_of_a_chain_row():
    n = 12
    tokens = torch.arange(n).unsqueeze(0)
    parents = torch.arange(-1, n - 1).unsqueeze(0)
    argmax = torch.arange(1, n + 1)  # every draft matches
    argmax[7] = 99                   # ... up to node 7, whose successor differs
    result = accept_greedy_device(rows_for(tokens, parents), argmax)
    assert result.num_sampled.item() == 8
    assert result.tokens[0].tolist() == list(range(1, 8)) + [99] + [-1] * (n - 8)


def test_hashed_uniforms_are_uniform_and_deterministic():
    seeds = torch.tensor([0, -5, 1 << 40, 12345])
    key = torch.tensor([7, 7, 100, 100000])
    u = hashed_uniform(seeds, key, torch.arange(50000), 3)
    assert u.dtype == torch.float64 and u.shape == (4, 50000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(u, hashed_uniform(seeds, key, torch.arange(50000), 3))
    for row in u:
        hist = torch.histc(row.float(), bins=10, min=0, max=1) / row.numel()
        assert float((hist - 0.1).abs().max()) < 0.01
    # rows, salts and neighbouring counters are unrelated
    assert float(torch.corrcoef(u)[0, 1:].abs().max()) < 0.02
    other = hashed_uniform(seeds, key, torch.arange(50000), 4)
    assert float(torch.corrcoef(torch.stack([u[0], other[0]]))[0, 1].abs()) < 0.02
    assert float(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1].abs()) < 0.02


#        0
#      /   \
#     1     2        tokens 2, 0
#    / \    |
#   3   4   5        tokens 1, 3 | 4
SMALL_PARENTS = [-1, 0, 0, 1, 1, 2]
SMALL_TOKENS = [5, 2, 0, 1, 3, 4]


def _sample_many(logits: torch.Tensor, trials: int, seed: int = 0,
                 parents=SMALL_PARENTS, tokens=SMALL_TOKENS):
    n = len(parents)
    rows = rows_for(torch.tensor([tokens]).expand(trials, n).clone(),
                    torch.tensor([parents]).expand(trials, n).clone(),
                    logits_rows=torch.arange(n).expand(trials, n))
    lse = torch.logsumexp(logits, dim=-1)
    return accept_sampled_device(rows, logits, lse, torch.full((trials,), seed),
                                 torch.arange(trials) * 3 + 11)


def _max_z(samples: torch.Tensor, probs: torch.Tensor, vocab: int) -> float:
    """Largest |frequency - p| over tokens, in standard errors of a frequency of len(samples)."""
    n = samples.numel()
    freq = torch.bincount(samples, minlength=vocab).double() / n
    p = probs.double()
    return float(((freq - p).abs() / (p * (1 - p) / n).sqrt().clamp(min=1e-12)).max())


@pytest.mark.parametrize("heavy_children", [False, True])
def test_sampled_acceptance_follows_the_target_distribution(heavy_children):
    torch.manual_seed(0)
    vocab, trials = 6, 60000
    logits = torch.randn(len(SMALL_PARENTS), vocab) * 1.5
    if heavy_children:  # most mass on the drafted children: every factor of the rule matters
        logits[0] = torch.log(torch.tensor([0.35, 0.05, 0.4, 0.1, 0.05, 0.05]))
        logits[1] = torch.log(torch.tensor([0.05, 0.3, 0.05, 0.45, 0.1, 0.05]))
    probs = logits.softmax(-1)
    result = _sample_many(logits, trials)
    first = result.tokens[:, 0]
    assert _max_z(first, probs[0], vocab) < 4.5
    # after an accepted child, the next token follows the target at that child
    node_of_token = {2: 1, 0: 2}
    for token, node in node_of_token.items():
        picked = first == token
        assert int(picked.sum()) > 1000
        assert bool((result.num_sampled[picked] >= 2).all())
        assert _max_z(result.tokens[picked, 1], probs[node], vocab) < 4.5
    # a first token that is no child ends the step with that token alone
    others = ~(first == 2) & ~(first == 0)
    assert bool((result.num_sampled[others] == 1).all())
    # the path agrees with the tokens
    deep = result.num_sampled == 3
    assert bool(deep.any())
    path = result.path[deep]
    assert bool((torch.tensor(SMALL_TOKENS)[path[:, 1]] == result.tokens[deep, 0]).all())


def test_sampled_acceptance_with_top_k_masked_logits_and_certain_tokens():
    vocab, trials = 6, 4000
    logits = torch.full((len(SMALL_PARENTS), vocab), float("-inf"))
    logits[0, 2] = 0.0          # the root's target emits token 2 for sure: child 1
    logits[1, [1, 5]] = 0.0     # node 1: tokens 1 (child 3) and 5 (no child), 50/50
    logits[3, 4] = 0.0
    logits[[2, 4, 5], 0] = 0.0
    result = _sample_many(logits, trials, seed=3)
    assert bool((result.tokens[:, 0] == 2).all())
    second = result.tokens[:, 1]
    assert set(second.tolist()) == {1, 5}
    share = float((second == 1).double().mean())
    assert abs(share - 0.5) < 0.04
    deep = second == 1
    assert bool((result.tokens[deep, 2] == 4).all()) and bool((result.num_sampled[deep] == 3).all())
    assert bool((result.num_sampled[~deep] == 2).all())


def test_sampled_acceptance_is_reproducible_per_seed():
    torch.manual_seed(1)
    logits = torch.randn(len(SMALL_PARENTS), 6)
    a = _sample_many(logits, 200, seed=9)
    b = _sample_many(logits, 200, seed=9)
    c = _sample_many(logits, 200, seed=10)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_select_rows_and_compaction_pairs():
    torch.manual_seed(2)
    logits = torch.randn(len(SMALL_PARENTS), 6)
    greedy = accept_greedy_device(rows_for(torch.tensor([SMALL_TOKENS] * 2),
                                           torch.tensor([SMALL_PARENTS] * 2),
                                           logits_rows=torch.arange(6).expand(2, 6)),
                                  logits.argmax(-1))
    sampled = _sample_many(logits, 2)
    mixed = select_rows(torch.tensor([True, False]), greedy, sampled)
    assert torch.equal(mixed.tokens[0], greedy.tokens[0])
    assert torch.equal(mixed.tokens[1], sampled.tokens[1])

    path = torch.tensor([[0, 2, 5, -1], [0, 1, 2, 3], [0, -1, -1, -1], [0, 3, -1, -1]])
    num_sampled = torch.tensor([3, 4, 1, 0])  # row 3: a chunked prefill, nothing sampled
    query_start = torch.tensor([0, 4, 8, 12])
    slot_mapping = torch.arange(16) * 10 + 1000
    src, dst = compaction_pairs(path, num_sampled, query_start, slot_mapping)
    pairs = [(s, d) for s, d in zip(src.tolist(), dst.tolist()) if s >= 0]
    # row 0: node 2 -> depth 1, node 5 -> depth 2; row 1 is already a chain; rows 2, 3 none
    assert pairs == [(1020, 1010), (1050, 1020)]
    assert src.shape == (4 * 3,) and bool(((src < 0) == (dst < 0)).all())
    # Only depths up to the tree's can move: a shallower bound drops exactly the deeper pairs.
    src2, dst2 = compaction_pairs(path, num_sampled, query_start, slot_mapping, max_depth=1)
    pairs2 = [(s, d) for s, d in zip(src2.tolist(), dst2.tolist()) if s >= 0]
    assert pairs2 == [(1020, 1010)] and src2.shape == (4 * 1,)


def test_compactor_warm_up_covers_every_call_size_of_the_v2_runner():
    from vllm_longspec.engine.tree_step import KVPathCompactor

    calls = []

    class Recording(KVPathCompactor):
        def __call__(self, src, dst):
            assert bool((src < 0).all()) and bool((dst < 0).all())  # moves nothing
            calls.append(src.shape[0])

    compactor = object.__new__(Recording)
    compactor.warm_up(5, 12, torch.device("cpu"))
    assert calls == [5, 10, 20, 40, 60]
    # the tile is the next power of two of the size: every size 1..12 requests shares one
    tile = [max(16, 1 << (n - 1).bit_length()) for n in calls]
    assert {max(16, 1 << (5 * r - 1).bit_length()) for r in range(1, 13)} == set(tile)
