"""`vllm-longspec bench NAME [args]`: runs a benchmark from `benchmarks/` (installed as
`vllm_longspec_benchmarks`)."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "memory": "bench_draft_memory",
    "tree-attention": "bench_tree_attention",
    "step-cost": "bench_step_cost",
    "drafting": "bench_drafting",
    "kv-compaction": "bench_kv_compaction",
    "beam-topk": "bench_beam_topk",
    "reliability": "reliability",
    "e2e": "bench_e2e",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: vllm-longspec bench {" + ",".join(BENCHMARKS) + "} [args...]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"vllm_longspec_benchmarks.{BENCHMARKS[argv[0]]}")
    return int(module.main(argv[1:]) or 0)
