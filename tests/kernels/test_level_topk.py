"""A beam-tree level's global top-k in a few launches (`level_topk.beam_topk`) against torch.topk:
random log-probabilities, rows split into several chunks (one partial), ties, rows of -inf."""

import pytest
import torch

from vllm_longspec_kernels.level_topk import (MAX_K, beam_topk, beam_topk_ref,
                                              beam_topk_supported)


def _by_value_then_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties broken by the lowest index (the kernel's rule), from a stable sort."""
    order = torch.sort(-values, dim=-1, stable=True).indices[:, :k]
    return values.gather(1, order), order


@pytest.mark.parametrize("batch, nodes, vocab, k, chunk", [
    (1, 1, 3000, 4, 4096),     # one chunk, no merge
    (2, 4, 1000, 8, 1024),     # 4 chunks over 4000, the last one partial; one merge
    (2, 4, 1000, 8, 64),       # 63 chunks -> 504 -> 64 -> 8 candidates: two merges
    (3, 5, 700, 5, 128),       # odd k, a partial last group
    (1, 2, 1500, 1, 2048),     # a chain's level
])
def test_equals_torch_topk(kit, batch, nodes, vocab, k, chunk):
    logprobs = kit.randn(batch, nodes, vocab).log_softmax(-1)
    scores = kit.randn(batch, nodes) * 3
    best, index = beam_topk(logprobs, scores, k, chunk=chunk)
    ref_best, ref_index = beam_topk_ref(logprobs, scores, k)
    assert torch.equal(best, ref_best)
    assert torch.equal(index, ref_index)  # random floats: no ties


def test_ties_go_to_the_lowest_index(kit):
    batch, nodes, vocab, k = 2, 3, 1200, 16
    # few distinct values, so many ties, over 57 chunks and three merges
    values = torch.randint(0, 6, (batch, nodes, vocab), generator=kit.gen).float()
    scores = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    best, index = beam_topk(values.to(kit.device), scores.to(kit.device), k, chunk=64)
    cumulative = (scores.unsqueeze(-1) + values).reshape(batch, -1)
    expected_best, expected_index = _by_value_then_index(cumulative, k)
    assert torch.equal(best.cpu(), expected_best)
    assert torch.equal(index.cpu(), expected_index)


def test_rows_of_minus_infinity_give_distinct_lowest_indices(kit):
    logprobs = torch.full((1, 2, 1100), float("-inf"))
    logprobs[0, 1, 7] = -1.0
    best, index = beam_topk(logprobs.to(kit.device), torch.zeros(1, 2).to(kit.device), 4,
                            chunk=16)
    assert best[0, 0].item() == -1.0 and index[0, 0].item() == 1100 + 7
    assert torch.isinf(best[0, 1:]).all()
    assert index[0, 1:].tolist() == [0, 1, 2]


def test_supported_cases():
    logprobs = torch.zeros(2, 4, 100)
    assert beam_topk_supported(logprobs, 16) and beam_topk_supported(logprobs, MAX_K)
    assert not beam_topk_supported(logprobs, MAX_K + 1)
    assert not beam_topk_supported(logprobs.half(), 4)
    assert not beam_topk_supported(logprobs[:, :, :50], 4)  # rows not contiguous
