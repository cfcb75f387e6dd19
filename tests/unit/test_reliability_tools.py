"""The reliability tooling's own logic, without a server: workloads, verdicts, catalogs, report."""

from __future__ import annotations

import json

import pytest

from vllm_longspec.reliability.bad_inputs import BAD_REQUEST_LIST, BAD_REQUESTS, judge
from vllm_longspec.reliability.bad_starts import BAD_START_LIST
from vllm_longspec.reliability.checks import judge_request
from vllm_longspec.reliability.client import RequestResult
from vllm_longspec.reliability.workload import (RequestSpec, WorkloadConfig, build_workload,
                                                shared_prefix, PromptSource)

CONFIG = WorkloadConfig.for_max_model_len(1024, num_requests=24)
NAMES = [c.name for c in BAD_REQUEST_LIST]


def test_workload_is_reproducible_and_varies_by_round():
    assert build_workload(CONFIG, 0, None, NAMES) == build_workload(CONFIG, 0, None, NAMES)
    assert build_workload(CONFIG, 0, None, NAMES) != build_workload(CONFIG, 1, None, NAMES)


@pytest.mark.parametrize("round_index", range(5))
def test_workload_mixes_everything_within_limits(round_index):
    specs = build_workload(CONFIG, round_index, None, NAMES)
    faults = {s.fault for s in specs}
    assert {"disconnect", "abort", "bad_request", "max_model_len", None} <= faults
    lengths = [len(s.prompt) for s in specs if s.fault is None]
    assert min(lengths) < 16 and max(lengths) > 256  # short (below min_prompt_len) to long
    assert {s.greedy for s in specs} == {True, False}
    assert {s.stream for s in specs if s.fault is None} == {True, False}
    for s in specs:
        if s.fault == "max_model_len":
            assert len(s.prompt) < 1024 < len(s.prompt) + s.max_tokens
        elif s.fault != "bad_request":
            assert len(s.prompt) + s.max_tokens < 1024
            assert all(0 <= t < 256 for t in s.prompt)
        if s.fault == "disconnect":
            assert s.stream and s.fault_after >= 1
        if s.fault == "abort":
            assert not s.stream and s.fault_after > 0
            assert s.max_tokens >= min(8 * CONFIG.max_tokens[1], 512)  # still running then


def test_shared_prefix_is_the_same_in_every_round():
    prefix = tuple(shared_prefix(CONFIG, PromptSource(CONFIG.token_range)))
    for round_index in range(3):
        shared = [s for s in build_workload(CONFIG, round_index) if s.shared_prefix]
        assert shared and all(s.prompt[:len(prefix)] == prefix for s in shared)


def test_corpus_prompts_are_slices_of_the_corpus():
    corpus = list(range(1000, 6000))
    specs = build_workload(WorkloadConfig.for_max_model_len(1024, num_requests=8), 0, corpus)
    for s in specs:
        if s.shared_prefix:  # the shared prefix, then a slice of its own
            continue
        start = s.prompt[0] - 1000
        assert list(s.prompt) == corpus[start:start + len(s.prompt)]


def _spec(**kw) -> RequestSpec:
    return RequestSpec("x", (1, 2, 3), kw.pop("max_tokens", 4), **kw)


def _result(**kw) -> RequestResult:
    return RequestResult("x", **{"status": 200, "finish_reason": "length", **kw})


@pytest.mark.parametrize("spec, result, reference, outcome", [
    (_spec(), _result(token_ids=[5, 6, 7, 8]), [5, 6, 7, 8], "served"),
    (_spec(), _result(token_ids=[5, 6, 9, 8]), [5, 6, 7, 8], "corrupted"),
    (_spec(), _result(token_ids=[5, 6, 7]), [5, 6, 7], "lost"),
    (_spec(), _result(status=500, error="EngineDeadError"), [5, 6, 7, 8], "lost"),
    (_spec(), _result(status=None, error="client timeout"), [5, 6, 7, 8], "lost"),
    (_spec(), _result(token_ids=[5, 6, 7, 8], finish_reason="stop"), None, "corrupted"),
    (_spec(), _result(token_ids=[5, 6, 7, 999]), None, "corrupted"),  # outside the vocabulary
    (_spec(temperature=1.0, seed=3), _result(token_ids=[1, 2, 3, 4]), None, "served"),
    (_spec(stream=True, fault="disconnect", fault_after=2),
     _result(token_ids=[5, 6], disconnected=True), [5, 6, 7, 8], "cut_short"),
    (_spec(stream=True, fault="disconnect", fault_after=2),
     _result(token_ids=[5, 7], disconnected=True), [5, 6, 7, 8], "corrupted"),
    (_spec(fault="abort", fault_after=0.1), _result(status=None, disconnected=True),
     [5, 6, 7, 8], "cut_short"),
    (_spec(fault="max_model_len", max_tokens=50), _result(token_ids=[5] * 7), [5] * 7, "served"),
    (_spec(fault="bad_request", bad="negative_temperature"),
     _result(status=400, error="temperature must be non-negative"), None, "refused"),
    (_spec(fault="bad_request", bad="negative_temperature"), _result(token_ids=[1]), None,
     "not_refused"),
    (_spec(fault="bad_request", bad="unknown_model"),
     _result(status=400, error="model does not exist"), None, "not_refused"),  # must be 404
])
def test_verdicts(spec, result, reference, outcome):
    max_model_len = len(spec.prompt) + 7
    assert judge_request(spec, result, reference, max_model_len, vocab_size=320).outcome == outcome


def test_bad_request_catalog_builds():
    assert len(BAD_REQUESTS) == len(BAD_REQUEST_LIST)
    for case in BAD_REQUEST_LIST:
        payload = case.payload("m", 1024)
        if case.name not in ("body_not_json", "nan_temperature"):
            json.loads(payload)
    assert not judge(BAD_REQUESTS["zero_n"], 500, "n must be at least 1")


def test_bad_start_catalog_names_are_unique():
    names = [c.name for c in BAD_START_LIST]
    assert len(names) == len(set(names)) >= 20
