"""Serving reliability of `vllm serve --speculative-model longspec`, at CI scale on CPU.

Two real servers on 127.0.0.1 (tiny fp32 models): LongSpec with a small KV budget (the
scheduler must preempt), chunked prefill, prefix caching, ``min_prompt_len`` and a drafting error
injected every few steps; and the same server without speculation. Rounds of mixed load
(concurrency 8; short to long prompts, shared long prefixes, greedy and seeded sampling,
streaming and not) with client disconnects, aborts, requests running into ``max_model_len`` and
bad requests. Every greedy output must equal the plain server's token for token; after every
round the server must be idle with KV usage back to 0. Then bad requests (HTTP 4xx) and broken
start-ups (refused, naming the problem). The same tooling runs at GPU scale:
``vllm-longspec bench reliability``.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from vllm_longspec.reliability.bad_inputs import bad_request_names, run_bad_requests
from vllm_longspec.reliability.bad_starts import (BAD_START_LIST, BAD_STARTS, StartContext,
                                                  refuse_as_server, refuse_in_process)
from vllm_longspec.reliability.prom import scrape
from vllm_longspec.reliability.report import build_report
from vllm_longspec.reliability.rounds import Endpoint, reference_outputs, run_round
from vllm_longspec.reliability.server import ServerConfig, launcher, start_servers
from vllm_longspec.reliability.workload import (WorkloadConfig, build_workload,
                                                probe_request)

MAX_MODEL_LEN = 1024
CONCURRENCY = 8
ROUNDS = 2
REQUESTS_PER_ROUND = 24
INJECT_EVERY = 40       # every 40th drafting step raises
MIN_PROMPT_LEN = 16


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_models):
    longspec = ServerConfig(
        target=tiny_models["qwen"], draft=tiny_models["zero_draft_qwen"],
        num_speculative_tokens=3, min_prompt_len=MIN_PROMPT_LEN, max_model_len=MAX_MODEL_LEN,
        max_num_seqs=CONCURRENCY, max_num_batched_tokens=512,
        # 9 blocks of 128 tokens for 8 concurrent requests of up to 1024 tokens: one long
        # request leaves a single block to the others, so the scheduler must preempt however
        # fast the rounds run (10 blocks left it to timing)
        num_gpu_blocks=9,
        env={"LONGSPEC_INJECT_DRAFT_ERRORS": str(INJECT_EVERY)},
        extra_args=("--enable-log-requests",))  # logs every abort that reaches the engine
    started = start_servers({"longspec": longspec, "reference": longspec.reference()},
                            str(tmp_path_factory.mktemp("reliability")))
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def report(servers, tmp_path_factory):
    spec, plain = servers["longspec"], servers["reference"]
    longspec = Endpoint(spec.base_url, spec.model, spec.rss_bytes, spec.alive)
    reference = Endpoint(plain.base_url, plain.model)
    workload = WorkloadConfig.for_max_model_len(MAX_MODEL_LEN, num_requests=REQUESTS_PER_ROUND)
    rounds_specs = [build_workload(workload, i, None, bad_request_names(speculative=True))
                    for i in range(ROUNDS)]
    probe = probe_request(workload)
    references = reference_outputs(reference, [s for r in rounds_specs for s in r] + [probe],
                                   concurrency=CONCURRENCY, max_model_len=MAX_MODEL_LEN)
    rounds, bad = [], []
    for i, specs in enumerate(rounds_specs):
        rounds.append(run_round(longspec, specs, references, probe, index=i,
                                concurrency=CONCURRENCY, max_model_len=MAX_MODEL_LEN,
                                vocab_size=320))
        if i == 0:  # between rounds: the next round shows that they disturbed nothing
            bad = asyncio.run(run_bad_requests(spec.base_url, spec.model, MAX_MODEL_LEN))
    result = build_report({"server": spec.config.to_dict(), "workload": workload.to_dict()},
                          rounds, bad, final_metrics=scrape(spec.base_url))
    path = result.to_json(str(tmp_path_factory.mktemp("report") / "reliability.json"))
    print(f"\n{result.markdown()}\nhealth: {result.health}\nreport: {path}")
    return result


def test_no_request_lost_or_corrupted(report):
    totals = report.totals()
    assert totals["lost"] == 0 and totals["corrupted"] == 0, report.failures()
    assert not report.failures(), report.failures()
    # greedy requests (streamed or not, under preemption and prefix hits) matched token for token
    assert totals["greedy_compared"] >= 15
    assert totals["outcomes"].get("served", 0) >= 30


def test_every_fault_was_injected_and_survived(report, servers):
    faults = report.totals()["faults"]
    for kind in ("disconnect", "abort", "max_model_len", "bad_request"):
        assert faults.get(kind, {}).get("fired", 0) >= 1, (kind, faults)
        assert faults[kind]["survived"] == faults[kind]["fired"], (kind, faults)
    cut_short = sum(faults[k]["fired"] for k in ("disconnect", "abort"))
    aborted = len(re.findall(r"Aborted request", servers["longspec"].tail(10**8)))
    # the disconnects really aborted requests inside the engine (a few finished first)
    assert 1 <= aborted <= cut_short, (aborted, cut_short)


def test_kv_pressure_preemption_and_prefix_cache_hits_happened(report):
    preemptions = sum(r.metrics["preemptions"] for r in report.rounds)
    prefix_hits = sum(r.metrics["prefix_cache_hit_tokens"] for r in report.rounds)
    assert preemptions > 0
    assert prefix_hits > 0


def test_server_back_to_baseline_after_every_round(report):
    for r in report.rounds:
        assert r.healthy_after and r.probe_ok, r.index
        assert r.idle.running == r.idle.waiting == 0, r.idle
        assert r.idle.kv_cache_usage == 0, r.idle
        assert r.idle.ring_rows_in_use is not None and r.idle.ring_rows_in_use <= 1, r.idle
    # host memory: vLLM's CPU worker itself grows ~15 MiB per round of this load (with or
    # without speculation); a per-request leak of LongSpec's would be far larger
    growth = report.memory_growth_mib
    assert growth is not None and growth < 25 * len(report.rounds) + 64, growth


def test_health_summary_in_metrics(servers, report):
    metrics = scrape(servers["longspec"].base_url)
    get = metrics.get
    assert get("vllm_longspec:workers") == 1
    assert get("vllm_longspec:drafted_requests_total") > 0
    assert get("vllm_longspec:fallbacks_total", reason="short_prompt") > 0
    errors = get("vllm_longspec:drafting_errors_total")
    steps = get("vllm_longspec:proposer_steps_total")  # successful drafting steps
    assert errors >= 1 and errors == (steps + errors) // INJECT_EVERY
    assert get("vllm_longspec:fallbacks_total", reason="drafting_error") >= errors
    # acceptance, from the same steps vLLM's own counters see
    assert get("vllm_longspec:drafts_total") == get("vllm:spec_decode_num_drafts_total")
    assert get("vllm_longspec:accepted_tokens_total") == \
        get("vllm:spec_decode_num_accepted_tokens_total")
    assert 1.0 < get("vllm_longspec:mean_acceptance_length") < 4.0
    info = [labels for (name, labels) in metrics.samples if name == "vllm_longspec:info"]
    assert dict(info[0])["num_speculative_tokens"] == "3"
    assert dict(info[0])["min_prompt_len"] == str(MIN_PROMPT_LEN)
    assert "LongSpec drafting failed" in servers["longspec"].tail(10**8)


def test_request_reaching_max_model_len_is_counted_as_fallback(servers):
    """A prompt two tokens short of max_model_len leaves no room to speculate: the request
    decodes without drafts, and the health summary counts it."""
    from vllm_longspec.reliability.load import run_load
    from vllm_longspec.reliability.workload import RequestSpec

    spec = servers["longspec"]
    before = scrape(spec.base_url).get("vllm_longspec:fallbacks_total", reason="max_model_len")
    prompt = tuple(3 + i % 250 for i in range(MAX_MODEL_LEN - 2))
    [result] = run_load(spec.base_url, spec.model, [RequestSpec("edge", prompt, 8)],
                        concurrency=1, max_model_len=MAX_MODEL_LEN, progress=False)
    assert result.status == 200 and result.finish_reason == "length"
    assert len(result.token_ids) == 2
    after = scrape(spec.base_url).get("vllm_longspec:fallbacks_total", reason="max_model_len")
    assert after > before


def test_bad_requests_get_4xx_naming_the_problem(report):
    assert len(report.bad_requests) == len(bad_request_names(speculative=True))
    for bad in report.bad_requests:
        assert bad.refused_as_expected, (bad.name, bad.status, bad.message)
    # and nothing else was disturbed: the round after them is clean
    assert report.rounds[1].ok, report.rounds[1].failures


@pytest.fixture(scope="module")
def start_context(tiny_models, tmp_path_factory):
    return StartContext(tiny_models["qwen"], tiny_models["zero_draft_qwen"],
                        str(tmp_path_factory.mktemp("bad_starts")))


@pytest.mark.parametrize("name", [case.name for case in BAD_START_LIST])
def test_bad_startup_refused(start_context, name):
    result = refuse_in_process(BAD_STARTS[name], start_context)
    assert result.refused, f"{name}: vllm serve accepted it"
    assert result.named_problem, f"{name}: the error does not say {BAD_STARTS[name].expect!r}:" \
                                 f"\n{result.message}"


@pytest.mark.parametrize("name, command", [("nan_weights", "vllm"),
                                           ("unknown_longspec_option", "vllm-longspec")])
def test_real_server_refuses_to_start(start_context, name, command):
    result = refuse_as_server(BAD_STARTS[name], start_context, launcher(command),
                              timeout_s=240)
    assert result.refused, f"{name}: the server started"
    assert result.named_problem, result.message
    assert result.seconds < 120  # refused before any engine process starts
