"""Load rounds against a LongSpec server, judged against a server without speculation.

A round sends its workload (`workload.build_workload`) with bounded concurrency, waits for the
server to go idle, sends a fixed probe request, and then requires:

* every request served, refused (bad input) or cut short by its own client -- none lost or
  corrupted, every greedy output equal to the reference server's token for token;
* the server alive and healthy, no request running or waiting, KV-cache usage back to 0, at
  most one draft ring row held (the probe's; rows are released lazily at the next step);
* the probe's output unchanged.
Resident memory of the server's processes is recorded after every round; `memory_growth_mib`
compares the last round with the first, after warm-up.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .checks import Verdict, judge_request
from .client import RequestResult
from .load import run_requests
from .prom import Metrics, scrape
from .workload import RequestSpec

# /metrics samples whose change over a round goes into its report.
ROUND_METRICS = {
    "preemptions": ("vllm:num_preemptions_total", {}),
    "prefix_cache_hit_tokens": ("vllm:prefix_cache_hits_total", {}),
    "aborted_requests": ("vllm:request_success_total", {"finished_reason": "abort"}),
    "drafts": ("vllm:spec_decode_num_drafts_total", {}),
    "draft_tokens": ("vllm:spec_decode_num_draft_tokens_total", {}),
    "accepted_tokens": ("vllm:spec_decode_num_accepted_tokens_total", {}),
    "http_4xx": ("http_requests_total", {"status": "4xx"}),
    "http_5xx": ("http_requests_total", {"status": "5xx"}),
    "longspec_drafted_requests": ("vllm_longspec:drafted_requests_total", {}),
    "longspec_fallbacks_short_prompt": ("vllm_longspec:fallbacks_total",
                                        {"reason": "short_prompt"}),
    "longspec_fallbacks_max_model_len": ("vllm_longspec:fallbacks_total",
                                         {"reason": "max_model_len"}),
    "longspec_fallbacks_drafting_error": ("vllm_longspec:fallbacks_total",
                                          {"reason": "drafting_error"}),
    "longspec_drafting_errors": ("vllm_longspec:drafting_errors_total", {}),
}


@dataclass
class Endpoint:
    """A server to send load to; `rss_bytes` / `alive` when it runs on this machine."""

    base_url: str
    model: str
    rss_bytes: Callable[[], int] | None = None
    alive: Callable[[], bool] | None = None
    device_memory_mib: Callable[[], float | None] | None = None


@dataclass
class IdleState:
    """The server after a round and its probe."""

    seconds_to_idle: float
    running: float
    waiting: float
    kv_cache_usage: float
    ring_rows_in_use: float | None
    rss_mib: float | None
    device_mib: float | None = None

    @property
    def ok(self) -> bool:
        return (self.running == 0 and self.waiting == 0 and self.kv_cache_usage == 0
                and (self.ring_rows_in_use is None or self.ring_rows_in_use <= 1))


@dataclass
class RoundReport:
    index: int
    duration_s: float
    requests: int
    kinds: dict[str, int]
    outcomes: dict[str, int]
    faults: dict[str, dict[str, int]]
    greedy_compared: int
    failures: list[dict[str, str]]
    healthy_after: bool
    probe_ok: bool
    idle: IdleState
    metrics: dict[str, float]
    results: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures and self.healthy_after and self.probe_ok and self.idle.ok

    def to_dict(self, with_results: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["idle"]["ok"] = self.idle.ok
        if not with_results:
            data.pop("results")
        return data


def kind_of(spec: RequestSpec) -> str:
    if spec.fault is not None:
        return spec.fault
    return ("greedy" if spec.greedy else "sampled") + ("_stream" if spec.stream else "")


def reference_outputs(reference: Endpoint, specs: Sequence[RequestSpec], *, concurrency: int,
                      max_model_len: int, progress: bool = True) -> dict[tuple, list[int]]:
    """Greedy outputs of the server without speculation for every greedy request of `specs`
    (non-streaming, run to completion), keyed by `RequestSpec.reference_key`."""
    unique: dict[tuple, RequestSpec] = {}
    for spec in specs:
        if spec.greedy and spec.fault != "bad_request":
            key = spec.reference_key()
            unique.setdefault(key, RequestSpec(f"ref-{len(unique)}", spec.prompt,
                                               spec.max_tokens))
    plain = list(unique.values())
    results = asyncio.run(run_requests(reference.base_url, reference.model, plain,
                                       concurrency=concurrency, max_model_len=max_model_len,
                                       desc="reference (no speculation)", progress=progress))
    outputs = {}
    for (key, spec), result in zip(unique.items(), results):
        if result.status != 200 or result.error or not result.token_ids:
            raise RuntimeError(f"the reference server failed {spec.request_id}: "
                               f"HTTP {result.status} {result.error}")
        outputs[key] = result.token_ids
    return outputs


def _delta(before: Metrics, after: Metrics) -> dict[str, float]:
    return {name: after.get(metric, **labels) - before.get(metric, **labels)
            for name, (metric, labels) in ROUND_METRICS.items()}


def wait_idle(endpoint: Endpoint, timeout_s: float = 120.0) -> tuple[float, Metrics]:
    """Polls ``/metrics`` until no request runs or waits; returns (seconds, last snapshot)."""
    start = time.perf_counter()
    while True:
        metrics = scrape(endpoint.base_url)
        busy = (metrics.get("vllm:num_requests_running")
                + metrics.get("vllm:num_requests_waiting"))
        elapsed = time.perf_counter() - start
        if busy == 0 or elapsed > timeout_s:
            return elapsed, metrics
        time.sleep(0.5)


def run_round(endpoint: Endpoint, specs: Sequence[RequestSpec], references: dict[tuple, list[int]],
              probe: RequestSpec, *, index: int, concurrency: int, max_model_len: int,
              vocab_size: int | None = None, progress: bool = True) -> RoundReport:
    """One round (see the module docstring)."""
    before = scrape(endpoint.base_url)
    start = time.perf_counter()
    results = asyncio.run(run_requests(endpoint.base_url, endpoint.model, specs,
                                       concurrency=concurrency, max_model_len=max_model_len,
                                       desc=f"round {index}", progress=progress))
    duration = time.perf_counter() - start
    verdicts = [judge_request(spec, result, references.get(spec.reference_key()),
                              max_model_len, vocab_size)
                for spec, result in zip(specs, results)]
    wait_idle(endpoint, timeout_s=60.0)
    probe_result = asyncio.run(run_requests(endpoint.base_url, endpoint.model, [probe],
                                            concurrency=1, max_model_len=max_model_len,
                                            progress=False))[0]
    probe_verdict = judge_request(probe, probe_result, references.get(probe.reference_key()),
                                  max_model_len, vocab_size)
    seconds_to_idle, after = wait_idle(endpoint)
    rss = endpoint.rss_bytes() if endpoint.rss_bytes is not None else None
    idle = IdleState(
        seconds_to_idle=seconds_to_idle, running=after.get("vllm:num_requests_running"),
        waiting=after.get("vllm:num_requests_waiting"),
        kv_cache_usage=after.get("vllm:kv_cache_usage_perc"),
        ring_rows_in_use=(after.get("vllm_longspec:draft_ring_rows_in_use")
                          if after.has("vllm_longspec:draft_ring_rows_in_use") else None),
        rss_mib=rss / 2**20 if rss is not None else None,
        device_mib=endpoint.device_memory_mib() if endpoint.device_memory_mib else None)
    alive = endpoint.alive() if endpoint.alive is not None else True
    failures = [_failure(v) for v in verdicts if not v.ok]
    if not probe_verdict.ok:
        failures.append(_failure(probe_verdict))
    return RoundReport(
        index=index, duration_s=duration, requests=len(specs),
        kinds=dict(Counter(kind_of(s) for s in specs)),
        outcomes=dict(Counter(v.outcome for v in verdicts)),
        faults=_faults(specs, results, max_model_len),
        greedy_compared=sum(1 for s, r in zip(specs, results)
                            if s.greedy and s.fault != "bad_request" and r.token_ids),
        failures=failures, healthy_after=alive and _healthy(endpoint),
        probe_ok=probe_verdict.ok, idle=idle, metrics=_delta(before, after),
        results=[dict(r.to_dict(), outcome=v.outcome, detail=v.detail, kind=kind_of(s))
                 for s, r, v in zip(specs, results, verdicts)])


def _failure(verdict: Verdict) -> dict[str, str]:
    return {"request_id": verdict.request_id, "outcome": verdict.outcome,
            "detail": verdict.detail}


def _faults(specs: Sequence[RequestSpec], results: Sequence[RequestResult],
            max_model_len: int) -> dict:
    """Per fault kind: injected (requests carrying it) and fired (the fault really happened:
    the client left before the end, the request ran into max_model_len, the bad request was
    answered)."""
    out: dict[str, dict[str, int]] = {}
    for spec, result in zip(specs, results):
        if spec.fault is None:
            continue
        entry = out.setdefault(spec.fault, {"injected": 0, "fired": 0})
        entry["injected"] += 1
        if spec.fault in ("disconnect", "abort"):
            fired = result.disconnected
        elif spec.fault == "max_model_len":
            fired = len(spec.prompt) + len(result.token_ids) == max_model_len
        else:
            fired = result.status is not None
        entry["fired"] += int(fired)
    return out


def _healthy(endpoint: Endpoint) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(endpoint.base_url + "/health", timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


def memory_growth_mib(rounds: Sequence[RoundReport], device: bool = False) -> float | None:
    """Change of the server's resident host memory (or, with `device`, of GPU memory in use)
    from the first to the last round; None without measurements."""
    values = [r.idle.device_mib if device else r.idle.rss_mib for r in rounds]
    values = [v for v in values if v is not None]
    return values[-1] - values[0] if len(values) >= 2 else None
