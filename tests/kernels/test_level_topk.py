"""A beam-tree level's global top-k in two launches (`level_topk.beam_topk`) against torch.topk:
random log-probabilities, rows over several chunks and groups (a partial last one), ties, rows of
-inf, widths that are not powers of two; the engine's self-check (`engine.topk_check`)."""

import importlib
import logging

import pytest
import torch

from vllm_longspec_kernels import level_topk
from vllm_longspec_kernels.level_topk import (MAX_K, beam_topk, beam_topk_by_extraction,
                                              beam_topk_ref, beam_topk_supported, padded_k)


def _by_value_then_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties broken by the lowest index (the kernel's rule), from a stable sort."""
    order = torch.sort(-values, dim=-1, stable=True).indices[:, :k]
    return values.gather(1, order), order


@pytest.mark.parametrize("batch, nodes, vocab, k, chunk", [
    (1, 1, 300, 4, 512),    # one chunk
    (2, 4, 100, 8, 32),     # 13 chunks in 4 groups of up to 4, the last chunk partial
    (3, 5, 40, 5, 16),      # k = 5 selects 8; 13 chunks in 2 groups, the last one short
    (1, 2, 150, 1, 64),     # k = 1 selects 2
])
def test_equals_torch_topk(kit, batch, nodes, vocab, k, chunk):
    logprobs = kit.randn(batch, nodes, vocab).log_softmax(-1)
    scores = kit.randn(batch, nodes) * 3
    best, index = beam_topk(logprobs, scores, k, chunk=chunk)
    ref_best, ref_index = beam_topk_ref(logprobs, scores, k)
    assert best.shape == (batch, k) and index.shape == (batch, k)
    assert torch.equal(best, ref_best)
    assert torch.equal(index, ref_index)  # random floats: no ties


def test_ties_go_to_the_lowest_index(kit):
    batch, nodes, vocab, k = 2, 3, 120, 16
    # few distinct values, so many ties, over 12 chunks in 2 groups
    values = torch.randint(0, 6, (batch, nodes, vocab), generator=kit.gen).float() - 6
    scores = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    best, index = beam_topk(values.to(kit.device), scores.to(kit.device), k, chunk=32)
    cumulative = (scores.unsqueeze(-1) + values).reshape(batch, -1)
    expected_best, expected_index = _by_value_then_index(cumulative, k)
    assert torch.equal(best.cpu(), expected_best)
    assert torch.equal(index.cpu(), expected_index)


def test_rows_of_minus_infinity_give_distinct_lowest_indices(kit):
    logprobs = torch.full((1, 2, 110), float("-inf"))
    logprobs[0, 1, 7] = -1.0
    best, index = beam_topk(logprobs.to(kit.device), torch.zeros(1, 2).to(kit.device), 4,
                            chunk=16)
    assert best[0, 0].item() == -1.0 and index[0, 0].item() == 110 + 7
    assert torch.isinf(best[0, 1:]).all()
    assert index[0, 1:].tolist() == [0, 1, 2]


def test_the_first_design_still_equals_torch_topk(kit):
    """`beam_topk_by_extraction`, timed beside `beam_topk` by bench_beam_topk."""
    logprobs = kit.randn(2, 4, 200).log_softmax(-1)
    scores = kit.randn(2, 4)
    best, index = beam_topk_by_extraction(logprobs, scores, 8, chunk=64)
    ref_best, ref_index = beam_topk_ref(logprobs, scores, 8)
    assert torch.equal(best, ref_best) and torch.equal(index, ref_index)


def test_supported_cases():
    logprobs = torch.zeros(2, 4, 100)
    assert beam_topk_supported(logprobs, 16) and beam_topk_supported(logprobs, MAX_K)
    assert not beam_topk_supported(logprobs, MAX_K + 1)
    assert not beam_topk_supported(logprobs.half(), 4)
    assert not beam_topk_supported(logprobs[:, :, :50], 4)  # rows not contiguous
    assert [padded_k(k) for k in (1, 2, 4, 5, 11, 16, 32)] == [2, 2, 4, 8, 16, 16, 32]


def test_self_check_passes_and_fails(kit, monkeypatch, caplog):
    from vllm_longspec.engine.topk_check import fused_topk_works

    device = torch.device(kit.device)
    # vLLM's logging config stops "vllm" loggers from propagating: listen on the logger itself
    plugin_logger = logging.getLogger("vllm.longspec")
    # both restored at teardown, also when an assertion fails; no duplicate records
    monkeypatch.setattr(plugin_logger, "handlers", [*plugin_logger.handlers, caplog.handler])
    monkeypatch.setattr(plugin_logger, "propagate", False)
    with caplog.at_level(logging.INFO, logger="vllm.longspec"):
        assert fused_topk_works((2, 3), device, chunk=64, vocab=20)
    assert "self-check passed for widths [2, 3]" in caplog.text

    def off_by_one(logprobs, scores, k, chunk):
        best, index = beam_topk(logprobs, scores, k, chunk=chunk)
        return best, index + 1

    # the module the check imports at call time (the conftest re-imports the package after
    # collection on CPU)
    monkeypatch.setattr(importlib.import_module(level_topk.__name__), "beam_topk", off_by_one)
    with caplog.at_level(logging.WARNING, logger="vllm.longspec"):
        assert not fused_topk_works((2,), device, chunk=64, vocab=20)
    assert "disagrees with torch.topk" in caplog.text
