"""LongSpec's health summary in the server's ``/metrics``.

The numbers come from two processes:

* the worker, where the proposer runs: requests drafted, fallbacks to plain decoding (with the
  reason), drafting errors, draft ring rows in use. `guard.drafting_guard` keeps them and
  mirrors them into a small memory-mapped file (`channel`), one per worker process;
* the API server, where vLLM's stat loggers see every engine step: drafts verified, tokens
  accepted, requests finished by reason. `stat_logger.LongSpecStatLogger` (a
  ``vllm.stat_logger_plugins`` entry point) accumulates those and registers a Prometheus
  collector that also reads the workers' files at scrape time.

Every metric is named ``vllm_longspec:*``; the README lists them.
"""
