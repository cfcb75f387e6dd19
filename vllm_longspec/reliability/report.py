"""The reliability report: what was sent, which faults and bad inputs were tried, every verdict.

`ReliabilityReport.failures` lists everything that went wrong (empty means: zero lost or
corrupted outputs, every fault survived, every bad input refused at the right place);
`to_json` writes all of it, `markdown` the summary table used in the README.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .bad_inputs import BadRequestResult
from .bad_starts import BadStartResult
from .prom import Metrics
from .rounds import RoundReport, memory_growth_mib

# The server's own health summary (vllm_longspec:*) as reported at the end.
HEALTH_SUMMARY = {
    "drafted_requests": ("vllm_longspec:drafted_requests_total", {}),
    "fallbacks_short_prompt": ("vllm_longspec:fallbacks_total", {"reason": "short_prompt"}),
    "fallbacks_max_model_len": ("vllm_longspec:fallbacks_total", {"reason": "max_model_len"}),
    "fallbacks_drafting_error": ("vllm_longspec:fallbacks_total", {"reason": "drafting_error"}),
    "drafting_errors": ("vllm_longspec:drafting_errors_total", {}),
    "drafts": ("vllm_longspec:drafts_total", {}),
    "accepted_tokens": ("vllm_longspec:accepted_tokens_total", {}),
    "mean_acceptance_length": ("vllm_longspec:mean_acceptance_length", {}),
    "requests_aborted": ("vllm_longspec:requests_finished_total", {"reason": "abort"}),
    "requests_error": ("vllm_longspec:requests_finished_total", {"reason": "error"}),
}


def health_summary(metrics: Metrics) -> dict[str, float]:
    return {name: metrics.get(metric, **labels) for name, (metric, labels) in HEALTH_SUMMARY.items()}


@dataclass
class ReliabilityReport:
    """Everything one reliability run did and found.

    Attributes:
        memory_growth_limit_mib: allowed growth of the server's resident host memory from the
            first to the last round. vLLM's CPU worker itself grows while its shape-keyed
            caches fill (~15 MiB per round of the CI load at first, levelling off after ~30
            rounds, with or without speculation); a per-request leak keeps growing.
        device_memory_growth_limit_mib: the same for GPU memory in use (vLLM allocates its KV
            cache up front; the caching allocator may still reserve a little for new shapes).
    """

    config: dict[str, Any]
    rounds: list[RoundReport] = field(default_factory=list)
    bad_requests: list[BadRequestResult] = field(default_factory=list)
    bad_starts: list[BadStartResult] = field(default_factory=list)
    health: dict[str, float] = field(default_factory=dict)
    memory_growth_limit_mib: float = 256.0
    device_memory_growth_limit_mib: float = 64.0

    @property
    def memory_growth_mib(self) -> float | None:
        return memory_growth_mib(self.rounds)

    @property
    def device_memory_growth_mib(self) -> float | None:
        return memory_growth_mib(self.rounds, device=True)

    def totals(self) -> dict[str, Any]:
        outcomes: Counter = Counter()
        kinds: Counter = Counter()
        faults: dict[str, Counter] = {}
        for r in self.rounds:
            outcomes.update(r.outcomes)
            kinds.update(r.kinds)
            for kind, counts in r.faults.items():
                faults.setdefault(kind, Counter()).update(counts)
        survived = {kind: sum(r.faults.get(kind, {}).get("fired", 0) for r in self.rounds
                              if r.healthy_after and r.probe_ok and r.idle.ok)
                    for kind in faults}
        return {
            "rounds": len(self.rounds),
            "requests_sent": sum(r.requests for r in self.rounds),
            "outcomes": dict(outcomes),
            "kinds": dict(kinds),
            "greedy_compared": sum(r.greedy_compared for r in self.rounds),
            "faults": {kind: dict(c, survived=survived[kind]) for kind, c in faults.items()},
            "bad_requests_tried": len(self.bad_requests) + outcomes.get("refused", 0)
            + outcomes.get("not_refused", 0),
            "bad_starts_tried": len(self.bad_starts),
            "lost": outcomes.get("lost", 0),
            "corrupted": outcomes.get("corrupted", 0),
            "memory_growth_mib": self.memory_growth_mib,
            "device_memory_growth_mib": self.device_memory_growth_mib,
        }

    def failures(self) -> list[str]:
        out = []
        for r in self.rounds:
            out += [f"round {r.index}: {f['request_id']} {f['outcome']}: {f['detail']}"
                    for f in r.failures]
            if not r.healthy_after:
                out.append(f"round {r.index}: server not healthy afterwards")
            if not r.idle.ok:
                out.append(f"round {r.index}: not back to baseline: {r.idle}")
        out += [f"bad request {b.name}: HTTP {b.status}: {b.message}"
                for b in self.bad_requests if not b.refused_as_expected]
        out += [f"bad start {b.name}: refused={b.refused} named_problem={b.named_problem}: "
                f"{b.message}" for b in self.bad_starts if not b.ok]
        growth = self.memory_growth_mib
        if growth is not None and growth > self.memory_growth_limit_mib:
            out.append(f"server memory grew {growth:.0f} MiB over the rounds "
                       f"(limit {self.memory_growth_limit_mib:.0f})")
        device = self.device_memory_growth_mib
        if device is not None and device > self.device_memory_growth_limit_mib:
            out.append(f"GPU memory in use grew {device:.0f} MiB over the rounds "
                       f"(limit {self.device_memory_growth_limit_mib:.0f})")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def to_dict(self, with_results: bool = False) -> dict[str, Any]:
        return {"ok": self.ok, "failures": self.failures(), "totals": self.totals(),
                "health": self.health, "config": self.config,
                "rounds": [r.to_dict(with_results) for r in self.rounds],
                "bad_requests": [vars(b) for b in self.bad_requests],
                "bad_starts": [b.to_dict() for b in self.bad_starts]}

    def to_json(self, path: str, with_results: bool = True) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(with_results), f, indent=1, default=str)
        return path

    def markdown(self) -> str:
        t = self.totals()
        o = t["outcomes"]
        rows = [("requests sent", t["requests_sent"], f"{t['rounds']} rounds"),
                ("served, output checked", o.get("served", 0),
                 f"{t['greedy_compared']} greedy outputs compared token for token"),
                ("cut short by their client", o.get("cut_short", 0), "disconnect / abort"),
                ("lost", t["lost"], ""), ("corrupted", t["corrupted"], "")]
        for kind, c in sorted(t["faults"].items()):
            rows.append((f"fault: {kind}", c.get("fired", 0),
                         f"injected {c.get('injected', 0)}, survived {c.get('survived', 0)}"))
        refused_bad = sum(b.refused_as_expected for b in self.bad_requests) + o.get("refused", 0)
        rows.append(("bad requests refused with 4xx", refused_bad,
                     f"of {t['bad_requests_tried']}"))
        rows.append(("bad start-ups refused", sum(b.ok for b in self.bad_starts),
                     f"of {t['bad_starts_tried']}"))
        growth, device = t["memory_growth_mib"], t["device_memory_growth_mib"]
        rows.append(("server host memory, first to last round",
                     "n/a" if growth is None else f"{growth:+.0f} MiB", "resident, all processes"))
        if device is not None:
            rows.append(("GPU memory in use, first to last round", f"{device:+.0f} MiB", ""))
        lines = ["| check | count | note |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)


def build_report(config: dict[str, Any], rounds: Sequence[RoundReport],
                 bad_requests: Sequence[BadRequestResult] = (),
                 bad_starts: Sequence[BadStartResult] = (),
                 final_metrics: Metrics | None = None,
                 memory_growth_limit_mib: float = 256.0) -> ReliabilityReport:
    return ReliabilityReport(config=config, rounds=list(rounds), bad_requests=list(bad_requests),
                             bad_starts=list(bad_starts),
                             health=health_summary(final_metrics) if final_metrics else {},
                             memory_growth_limit_mib=memory_growth_limit_mib)
