"""`LongSpecStatLogger`: the ``vllm.stat_logger_plugins`` entry point behind ``/metrics``.

``vllm serve`` (vLLM's ``AsyncLLM``) constructs it once per engine beside its own loggers and
feeds it every engine step's stats. For a LongSpec server it accumulates verification results
and finished requests, and registers (once per process) a Prometheus collector on the registry
that ``/metrics`` serves; the collector adds the workers' counters at scrape time. For a server
without LongSpec it does nothing. When vLLM logs its stats (every 10 s while busy) it also logs a
one-line LongSpec summary.

Metrics (all ``vllm_longspec:``):

=================================  ======  =====================================================
name                               type    meaning
=================================  ======  =====================================================
info{draft,num_speculative_tokens,  gauge  1; the LongSpec configuration being served
     window,min_prompt_len,tree_widths}
drafted_requests_total             counter request-steps that got a LongSpec draft
fallbacks_total{reason}            counter request-steps decoded without speculation, by reason:
                                           short_prompt (below min_prompt_len), max_model_len
                                           (a request with no room left to speculate;
                                           the rest of its batch still drafts),
                                           drafting_error
drafting_errors_total              counter drafting steps that raised (the step decoded plainly)
proposer_steps_total               counter engine steps that ran the proposer
draft_ring_rows_in_use             gauge   draft ring rows held by requests
drafts_total                       counter drafts verified by the target (vLLM's num_drafts)
draft_tokens_total                 counter drafted tokens verified
accepted_tokens_total              counter drafted tokens accepted
mean_acceptance_length             gauge   1 + accepted / drafts (vLLM's definition), cumulative
draft_acceptance_rate              gauge   accepted / drafted tokens, cumulative
requests_finished_total{reason}    counter finished requests: stop, length, abort, error, ...
workers                            gauge   worker processes reporting (0: none has drafted yet)
=================================  ======  =====================================================
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..compat.metrics_api import StatLoggerBase, finish_reasons, spec_decoding_counts
from .channel import read_health_dir

PREFIX = "vllm_longspec:"
# Worker counters (keys of LongSpecProposer.stats, plus the guard's) and how they are exposed.
FALLBACK_REASONS = {"skipped_short_prompt": "short_prompt",
                    "skipped_max_model_len": "max_model_len",
                    "fallback_drafting_error": "drafting_error"}
WORKER_COUNTERS = {"steps": ("proposer_steps", "Engine steps that ran the LongSpec proposer."),
                   "drafted_requests": ("drafted_requests",
                                        "Request-steps that got a LongSpec draft."),
                   "prompt_lookup_requests": ("prompt_lookup_requests",
                                              "Request-steps whose chain was copied from "
                                              "their own history (prompt_lookup_max; V1 "
                                              "runner only: the V2 device path keeps no "
                                              "count, it would need a host sync)."),
                   "drafting_errors": ("drafting_errors",
                                       "Drafting steps that raised; their requests decoded "
                                       "that step without speculation.")}

# vLLM's own loggers write under "vllm"; a child logger shows up in the server log.
log = logging.getLogger("vllm.longspec")


@dataclass
class FrontendTotals:
    """What the API server's stat loggers saw, summed over engines."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class HealthCollector:
    """Prometheus collector: the frontend totals plus the workers' counters, read on scrape."""

    def __init__(self) -> None:
        self.totals = FrontendTotals()
        self.info: dict[str, str] = {}
        self.lock = threading.Lock()

    def describe(self) -> list:
        return []  # names are dynamic; skip the registry's describe-time collect

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.lock:
            totals = FrontendTotals(self.totals.drafts, self.totals.draft_tokens,
                                    self.totals.accepted_tokens, dict(self.totals.finished))
            info = dict(self.info)
        workers = read_health_dir()
        counters = workers.counters

        def counter(name: str, doc: str, value: float) -> Any:
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            return family

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        family = GaugeMetricFamily(PREFIX + "info", "The LongSpec configuration being served.",
                                   labels=sorted(info))
        family.add_metric([info[k] for k in sorted(info)], 1.0)
        yield family
        for key, (name, doc) in WORKER_COUNTERS.items():
            yield counter(name, doc, counters.get(key, 0))
        family = CounterMetricFamily(
            PREFIX + "fallbacks", "Request-steps decoded without speculation, by reason.",
            labels=["reason"])
        for key, reason in FALLBACK_REASONS.items():
            family.add_metric([reason], counters.get(key, 0))
        yield family
        known = set(WORKER_COUNTERS) | set(FALLBACK_REASONS)
        for key in sorted(set(counters) - known):
            yield counter(f"proposer_{key}", f"LongSpec proposer counter {key!r}.",
                          counters[key])
        yield gauge("draft_ring_rows_in_use", "Draft ring-buffer rows held by requests.",
                    workers.gauges.get("ring_rows_in_use", 0))
        yield gauge("workers", "Worker processes reporting LongSpec health.", workers.workers)
        yield counter("drafts", "Drafts verified by the target.", totals.drafts)
        yield counter("draft_tokens", "Drafted tokens verified by the target.",
                      totals.draft_tokens)
        yield counter("accepted_tokens", "Drafted tokens accepted.", totals.accepted_tokens)
        yield gauge("mean_acceptance_length", "1 + accepted tokens / drafts, since start.",
                    totals.mean_acceptance_length)
        yield gauge("draft_acceptance_rate", "Accepted / drafted tokens, since start.",
                    totals.acceptance_rate)
        family = CounterMetricFamily(PREFIX + "requests_finished",
                                     "Finished requests by finish reason.", labels=["reason"])
        for reason in sorted(set(totals.finished) | {"stop", "length", "abort", "error"}):
            family.add_metric([reason], totals.finished.get(reason, 0))
        yield family

    def observe(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        counts = spec_decoding_counts(scheduler_stats) if scheduler_stats is not None else None
        reasons = finish_reasons(iteration_stats) if iteration_stats is not None else []
        with self.lock:
            if counts is not None:
                self.totals.drafts += counts[0]
                self.totals.draft_tokens += counts[1]
                self.totals.accepted_tokens += counts[2]
            for reason in reasons:
                self.totals.finished[reason] = self.totals.finished.get(reason, 0) + 1


_collector: HealthCollector | None = None
_collector_lock = threading.Lock()


def health_collector() -> HealthCollector:
    """The process's collector, registered on prometheus_client's default registry (the one
    vLLM's ``/metrics`` serves) on first use."""
    global _collector
    with _collector_lock:
        if _collector is None:
            from prometheus_client import REGISTRY

            collector = HealthCollector()
            REGISTRY.register(collector)
            _collector = collector
        return _collector


def longspec_options(vllm_config: Any) -> dict[str, Any] | None:
    additional = getattr(vllm_config, "additional_config", None) or {}
    options = additional.get("longspec") if isinstance(additional, dict) else None
    return options if isinstance(options, dict) else None


class LongSpecStatLogger(StatLoggerBase):
    """Per-engine stat logger (vLLM builds one per engine index)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.engine_index = engine_index
        options = longspec_options(vllm_config)
        self.collector = health_collector() if options is not None else None
        if self.collector is not None:
            widths = options.get("tree_widths")
            self.collector.info = {
                "draft": str(options.get("draft", "")),
                "num_speculative_tokens": str(options.get("num_speculative_tokens", "")),
                "window": str(options.get("window", "")),
                "min_prompt_len": str(options.get("min_prompt_len", 0)),
                "tree_widths": ",".join(map(str, widths)) if widths else "chain",
            }
        self._logged_state: tuple = ()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if self.collector is not None:
            self.collector.observe(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        if self.collector is not None:
            log.info("LongSpec health metrics (vllm_longspec:*) are served at /metrics")

    def log(self) -> None:
        if self.collector is None or self.engine_index != 0:
            return
        totals = self.collector.totals
        counters = read_health_dir().counters
        state = (totals.drafts, tuple(sorted(counters.items())))
        if state == self._logged_state:
            return  # idle: nothing new to report
        self._logged_state = state
        fallbacks = {reason: counters.get(key, 0) for key, reason in FALLBACK_REASONS.items()}
        log.info("LongSpec: %d request-steps drafted, mean acceptance length %.2f, fallbacks "
                 "to plain decoding %s, drafting errors %d",
                 counters.get("drafted_requests", 0), totals.mean_acceptance_length,
                 fallbacks, counters.get("drafting_errors", 0))
