"""The vLLM pieces LongSpec's health summary reads (same in vLLM 0.26 and 0.32).

* ``vllm.v1.metrics.loggers.StatLoggerBase``: the base of ``vllm.stat_logger_plugins`` entry
  points, constructed by ``AsyncLLM`` (``vllm serve``) as ``cls(vllm_config, engine_index)``
  and fed ``record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)`` every step;
* ``SchedulerStats.spec_decoding_stats`` (``SpecDecodingStats``: ``num_drafts``,
  ``num_draft_tokens``, ``num_accepted_tokens``) and ``IterationStats.finished_requests``
  (``FinishedRequestStats.finish_reason``, a ``FinishReason`` whose ``str`` is "stop",
  "length", "abort", "error" or "repetition"). vLLM calls these "not stable interfaces", hence
  the defensive reads;
* the worker's data- and tensor-parallel ranks (``vllm.distributed``).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: F401  (re-exported)


def spec_decoding_counts(scheduler_stats: Any) -> tuple[int, int, int] | None:
    """(drafts, draft tokens, accepted tokens) verified in one engine step, if any."""
    stats = getattr(scheduler_stats, "spec_decoding_stats", None)
    if stats is None:
        return None
    return (int(getattr(stats, "num_drafts", 0)), int(getattr(stats, "num_draft_tokens", 0)),
            int(getattr(stats, "num_accepted_tokens", 0)))


def finish_reasons(iteration_stats: Any) -> list[str]:
    """The finish reason of every request that finished in one engine step."""
    finished = getattr(iteration_stats, "finished_requests", None) or []
    return [str(getattr(f, "finish_reason", "unknown")) for f in finished]


def worker_ranks(vllm_config: Any) -> tuple[int, int]:
    """(data-parallel rank, tensor-parallel rank) of the calling worker process."""
    dp_rank = int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        tp_rank = int(get_tensor_model_parallel_rank())
    except Exception:  # model parallel groups not initialised (single-process tools)
        tp_rank = 0
    return dp_rank, tp_rank
