"""`drafting_guard`: a drafting error never takes the server down, and every step is counted.

Drafts are only proposals -- vLLM verifies each against the target -- so a step without drafts
is always correct, just slower. When drafting raises, the guard logs the error, answers "no
drafts" for the whole batch (those requests decode one plain token this step) and counts it;
the next step drafts again. Without it, one exception in the proposer would kill the engine and
with it every request on the server.

After every step the guard publishes the proposer's ``stats`` (a dict of int counters) and the
draft ring's rows in use to this worker's health file (see `channel`), for ``/metrics``.

Fault injection for reliability tests: with ``LONGSPEC_INJECT_DRAFT_ERRORS=N`` every N-th
drafting step raises `InjectedDraftingError` before drafting.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

from .channel import HEALTH_DIR_ENV, WorkerHealthFile

INJECT_ENV = "LONGSPEC_INJECT_DRAFT_ERRORS"
# Full tracebacks for the first few errors, then one line every `_LOG_EVERY` errors.
_LOG_FIRST = 3
_LOG_EVERY = 1000

logger = logging.getLogger("vllm.longspec")


class InjectedDraftingError(RuntimeError):
    """Raised on purpose by the fault injector (``LONGSPEC_INJECT_DRAFT_ERRORS``)."""


class _WorkerHealth:
    """Per-proposer state of the guard: the health file and the fault injector."""

    def __init__(self, proposer: Any):
        self.file: WorkerHealthFile | None = None
        folder = os.environ.get(HEALTH_DIR_ENV)
        if folder:
            from ..compat.metrics_api import worker_ranks

            dp_rank, tp_rank = worker_ranks(proposer.vllm_config)
            try:
                self.file = WorkerHealthFile(folder, dp_rank, tp_rank)
            except OSError as e:  # metrics are not worth failing the engine for
                logger.warning("LongSpec health metrics disabled: cannot write %s: %s",
                               folder, e)
        every = os.environ.get(INJECT_ENV, "").strip()
        self.inject_every = int(every) if every else 0
        self.calls = 0

    def maybe_inject(self) -> None:
        self.calls += 1
        if self.inject_every and self.calls % self.inject_every == 0:
            raise InjectedDraftingError(
                f"fault injected by {INJECT_ENV}={self.inject_every} (step {self.calls})")

    def publish(self, proposer: Any) -> None:
        if self.file is None:
            return
        ring = getattr(proposer, "ring", None)
        gauges = {"ring_rows_in_use": ring.rows_in_use} if ring is not None else {}
        self.file.publish(proposer.stats, gauges)


def _health_of(proposer: Any) -> _WorkerHealth:
    health = proposer.__dict__.get("_longspec_health")
    if health is None:
        health = proposer.__dict__["_longspec_health"] = _WorkerHealth(proposer)
    return health


def publish(proposer: Any) -> None:
    """Publishes `proposer`'s counters now (for counts made outside ``propose``)."""
    _health_of(proposer).publish(proposer)


def guarded_drafting(proposer: Any, draft: Callable[[], Any], fallback: Callable[[], Any],
                     num_requests: int) -> Any:
    """`drafting_guard` for proposers that return device tensors (vLLM's Model Runner V2):
    runs ``draft()``; when it raises, counts and logs the error and returns ``fallback()``
    (drafts that verification will simply reject). Publishes the counters either way."""
    health = _health_of(proposer)
    try:
        health.maybe_inject()
        drafts = draft()
    except Exception as error:
        _count_error(proposer, error, num_requests)
        drafts = fallback()
    health.publish(proposer)
    return drafts


def _count_error(proposer: Any, error: Exception, num_requests: int) -> None:
    stats = proposer.stats
    errors = stats["drafting_errors"] = stats.get("drafting_errors", 0) + 1
    stats["fallback_drafting_error"] = stats.get("fallback_drafting_error", 0) + num_requests
    if errors <= _LOG_FIRST:
        logger.error("LongSpec drafting failed (error %d); %d requests decode this "
                     "step without speculation", errors, num_requests, exc_info=error)
    elif errors % _LOG_EVERY == 0:
        logger.error("LongSpec drafting failed %d times so far (last: %r)", errors, error)


def drafting_guard(propose: Callable[..., list[list[int]]]) -> Callable[..., list[list[int]]]:
    """Decorates a proposer's ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
    slot_mappings=None) -> list[list[int]]`` (vLLM's custom-class interface).

    The proposer must have ``stats: dict[str, int]`` and ``vllm_config``; a ``ring`` with
    ``rows_in_use`` is published when present. The guard adds two counters to ``stats``:
    ``drafting_errors`` (failed steps) and ``fallback_drafting_error`` (request-steps decoded
    without drafts because their step failed).
    """

    @functools.wraps(propose)
    def guarded(self: Any, sampled_token_ids: list[list[int]], *args: Any,
                **kwargs: Any) -> list[list[int]]:
        health = _health_of(self)
        try:
            health.maybe_inject()
            drafts = propose(self, sampled_token_ids, *args, **kwargs)
        except Exception as error:
            _count_error(self, error, sum(1 for sampled in sampled_token_ids if sampled))
            drafts = [[] for _ in sampled_token_ids]
        health.publish(self)
        return drafts

    return guarded
