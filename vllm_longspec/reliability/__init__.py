"""Reliability tooling: load, faults and bad input against a real OpenAI server, with checks.

* `workload`: the request mix of a load round (prompt lengths short to long, shared long
  prefixes, greedy and sampled, streaming and not, injected client faults, bad requests);
* `client`, `load`: send it with bounded concurrency (asyncio + aiohttp, a progress bar);
* `server`: start / stop ``vllm serve`` subprocesses; `prom`: read ``/metrics``;
* `bad_inputs`, `bad_drafts`, `bad_starts`: requests that must get an HTTP 4xx, broken drafts
  and configurations that must stop the server from starting;
* `rounds`: a round = load + faults, then the server must be idle with its memory back to
  baseline; `report`: every check's verdict, as JSON and as a table.

`vllm-longspec bench reliability` runs it all (``benchmarks/reliability.py``);
``tests/e2e/test_reliability.py`` runs it at CI scale on CPU.
"""
