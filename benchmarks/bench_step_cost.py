"""Cost of one LongSpec step against one plain decode step, at long context, inside vLLM.

For each context length it runs, each engine in its own process (vLLM keeps CUDA-graph pools per
process), one request whose prompt has that many tokens:

* plain: vLLM without speculation -- decode time per token = one plain decode step;
* longspec: the same request with LongSpec (tree or chain) and an untrained draft, so that almost
  nothing is accepted and every step yields one token: time per token = one LongSpec step
  (drafting all levels + verifying the whole tree + acceptance and KV bookkeeping). The drafting
  part is timed inside the proposer (device-synchronised) and reported on its own.

Every engine step after the request's first token is timed (the prefill drops out); the median
step and the decode time per generated token are reported.
Default target: a Llama-3-8B-shaped model with dummy weights (``load_format="dummy"``): cost only,
no quality. Prints a table, writes JSON and a PNG.

    python -m vllm_longspec_benchmarks.bench_step_cost --out bench_out            # GPU
    vllm-longspec bench step-cost --target TINY --contexts 512 --eager --dtype float32  # CPU check
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

from vllm_longspec.config import DRAFT_WEIGHT_DTYPES

from .model_shapes import SHAPES, shape_folder, untrained_draft

def measure(config: dict[str, Any]) -> dict[str, Any]:
    """One engine, one request: per-token decode time (runs in a child process)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_longspec.compat.vllm_api import engine_counters, shutdown_llm

    context, new_tokens = config["context"], config["new_tokens"]
    kwargs: dict[str, Any] = dict(
        model=config["target"], dtype=config["dtype"], max_model_len=context + new_tokens + 256,
        enforce_eager=config["eager"], seed=0, max_num_seqs=4, skip_tokenizer_init=True,
        enable_prefix_caching=False, gpu_memory_utilization=config["gpu_memory_utilization"],
        disable_log_stats=False)
    if config["dummy"]:
        kwargs["load_format"] = "dummy"
    if config["spec"]:
        kwargs["speculative_config"] = config["spec"]
        kwargs["additional_config"] = config["additional"]
    llm = LLM(**kwargs)
    try:
        with open(os.path.join(config["target"], "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        span = min(1000, vocab - 10)
        prompt = [TokensPrompt(prompt_token_ids=[(7 * i + 3) % span + 5 for i in range(context)])]

        engine = llm.llm_engine

        def decode_steps(request_id: str, max_tokens: int) -> tuple[list[float], int]:
            """Wall time of every engine step after the first token, and tokens produced."""
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                    detokenize=False)
            engine.add_request(request_id, prompt[0], params)
            times, produced = [], 0
            while engine.has_unfinished_requests():
                start = time.perf_counter()
                outputs = engine.step()
                elapsed = time.perf_counter() - start
                if produced >= 1:
                    times.append(elapsed)
                for out in outputs:
                    produced = len(out.outputs[0].token_ids)
            return times, produced

        decode_steps("warmup", 4)  # graphs, kernels' JIT
        draft_before = _draft_timing(llm) if config["spec"] else None
        times, produced = decode_steps("measured", 1 + new_tokens)
        draft_after = _draft_timing(llm) if config["spec"] else None
        counters = engine_counters(llm)
    finally:
        shutdown_llm(llm)
    times_sorted = sorted(times)
    result = {"step_ms": times_sorted[len(times) // 2] * 1e3,
              "per_token_ms": sum(times) / max(1, produced - 1) * 1e3,
              "decode_steps": len(times),
              "mean_acceptance_length": counters.get("mean_acceptance_length")}
    if draft_before is not None and draft_after is not None:
        steps = draft_after["steps"] - draft_before["steps"]
        seconds = draft_after["seconds"] - draft_before["seconds"]
        result["draft_ms_per_step"] = seconds / steps * 1e3 if steps else None
    return result


def _draft_timing(llm: Any) -> dict[str, float] | None:
    from vllm_longspec.compat.vllm_api import drafter_timing

    return drafter_timing(llm)


def _run_child(config: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, LONGSPEC_TIME_DRAFTING="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               **config.get("env", {}))
    proc = subprocess.run([sys.executable, "-m", "vllm_longspec_benchmarks.bench_step_cost",
                           "--child", json.dumps(config)], env=env, capture_output=True,
                          text=True)
    # which bookkeeping path the engine really ran (the plugin logs it through vLLM's logger)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "tree bookkeeping" in line or "beam-tree top-k" in line:
            print(f"{config['name']}: {line.strip()}", flush=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"step-cost child failed ({proc.returncode}) for {config['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--target", default=None, help="model folder (default: --shape "
                        "with dummy weights)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--draft", default=None, help="default: an untrained draft")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--tree-widths", nargs="+", default=["4,16,16,16,16"],
                        help="one or more tree shapes, each measured beside the same plain step "
                             "(e.g. 4,16,16,16,16 4,16,16,16,11)")
    parser.add_argument("--tree-runners", default="v2",
                        help="model runners to verify the tree on (v2, v1 or v2,v1: "
                             "LONGSPEC_TREE_RUNNER)")
    parser.add_argument("--bookkeeping", default="fused",
                        help="tree bookkeeping paths to measure, comma-separated: fused (the "
                        "Triton kernels, the default on CUDA) and/or torch "
                        "(LONGSPEC_TREE_BOOKKEEPING=torch)")
    parser.add_argument("--beam-topk", default="default",
                        help="drafting top-k paths to measure, comma-separated: default (the "
                        "engine's), triton and/or torch (LONGSPEC_BEAM_TOPK)")
    parser.add_argument("--chain", type=int, default=None, help="also measure a chain of K")
    parser.add_argument("--draft-vocab-size", type=int, default=None,
                        help="LongSpec drafts over this many most frequent tokens")
    parser.add_argument("--draft-weight-dtype", default="auto", choices=DRAFT_WEIGHT_DTYPES,
                        help="LongSpec's draft_weight_dtype")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--merge-logs", nargs="+", default=None, metavar="LOG",
                        help="no engines: report the ROW lines earlier runs printed")
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    if args.merge_logs:
        os.makedirs(args.out, exist_ok=True)
        _report(rows_from_logs(args.merge_logs), [],
                {"target": args.target or f"{args.shape} shape (dummy weights)",
                 "dtype": args.dtype, "merged_from": args.merge_logs}, args.out)
        return 0

    os.makedirs(args.out, exist_ok=True)
    dummy = args.target is None
    target = args.target or shape_folder(args.shape, args.out)
    draft = args.draft or untrained_draft(args.out, target)
    vocab = {"draft_vocab_size": args.draft_vocab_size} if args.draft_vocab_size else {}
    suffix = f", draft vocab {args.draft_vocab_size}" if args.draft_vocab_size else ""
    if args.draft_weight_dtype != "auto":
        vocab["draft_weight_dtype"] = args.draft_weight_dtype
        suffix += f", {args.draft_weight_dtype} draft"
    variants: list[tuple[str, dict | None, dict, dict]] = [("plain", None, {}, {})]
    try:
        variants += tree_variants(args.tree_widths, args.tree_runners.split(","),
                                  args.bookkeeping.split(","), args.beam_topk.split(","),
                                  draft, vocab, suffix)
    except ValueError as error:
        parser.error(str(error))
    if args.chain:
        variants.append((f"chain {args.chain}{suffix}", {"method": "longspec", "model": draft,
                                                          "num_speculative_tokens": args.chain},
                         {"longspec": dict(vocab)}, {}))
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    jobs = [(int(c), v) for c in args.contexts.split(",") for v in variants]
    for context, (name, spec, additional, env) in tqdm(jobs, desc="engines"):
        config = dict(name=name, target=target, dtype=args.dtype, eager=args.eager,
                      dummy=dummy, context=context, new_tokens=args.new_tokens, spec=spec,
                      additional=additional, gpu_memory_utilization=args.gpu_memory_utilization,
                      env=env)
        try:
            rows.append({"context": context, "variant": name, **_run_child(config)})
            print("ROW " + json.dumps(rows[-1]), flush=True)
        except RuntimeError as error:  # recorded; the other engines still run
            print(f"{name} at {context}: {error}", flush=True)
            failed.append({"context": context, "variant": name, "error": str(error)})
    meta = {"target": f"{args.shape} shape (dummy weights)" if dummy else target,
            "dtype": args.dtype, "eager": args.eager, "new_tokens": args.new_tokens}
    _report(rows, failed, meta, args.out)
    return 1 if failed else 0


def tree_variants(shapes: list[str], runners: list[str], bookkeepings: list[str],
                  topks: list[str], draft: str, longspec: dict[str, Any], suffix: str
                  ) -> list[tuple[str, dict, dict, dict]]:
    """(name, speculative_config, additional_config, environment) of every tree engine: each
    shape on each runner with each bookkeeping path (fused, torch) and drafting top-k (default,
    triton, torch)."""
    for path in bookkeepings:
        if path not in ("fused", "torch"):
            raise ValueError(f"--bookkeeping: unknown path {path!r} (fused, torch)")
    for path in topks:
        if path not in ("default", "triton", "torch"):
            raise ValueError(f"--beam-topk: unknown path {path!r} (default, triton, torch)")
    variants = []
    for shape in shapes:
        widths = [int(w) for w in shape.split(",")]
        for runner, bookkeeping, topk in itertools.product(runners, bookkeepings, topks):
            label = ", ".join([runner] + ["torch bookkeeping"] * (bookkeeping == "torch")
                              + [f"{topk} top-k"] * (topk != "default"))
            env = {"LONGSPEC_TREE_RUNNER": runner}
            if bookkeeping == "torch":
                env["LONGSPEC_TREE_BOOKKEEPING"] = "torch"
            if topk != "default":
                env["LONGSPEC_BEAM_TOPK"] = topk
            variants.append((f"tree {shape}{suffix} ({label})",
                             {"method": "longspec", "model": draft,
                              "num_speculative_tokens": len(widths)},
                             {"longspec": {"tree_widths": widths, **longspec}}, env))
    return variants


def rows_from_logs(paths: list[str]) -> list[dict[str, Any]]:
    """The rows that earlier runs printed (``ROW {...}`` lines), in order; a (context, variant)
    measured twice keeps its last row."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if "ROW {" in line:  # a progress bar may share the line
                    row = json.loads(line[line.index("ROW {") + len("ROW "):])
                    rows[(row["context"], row["variant"])] = row
    return list(rows.values())


def _report(rows: list[dict[str, Any]], failed: list[dict[str, Any]], meta: dict[str, Any],
            out: str) -> None:
    """Ratios to the plain step of the same context, the table, step_cost.json and .png."""
    rows = sorted(rows, key=lambda r: (r["context"], r["variant"] != "plain"))
    for row in rows:
        plain = next(r for r in rows if r["context"] == row["context"] and r["variant"] == "plain")
        row["x_plain_step"] = row["step_ms"] / plain["step_ms"]
        if row.get("draft_ms_per_step") is not None:
            row["draft_x_plain_step"] = row["draft_ms_per_step"] / plain["step_ms"]
    print(f"{'context':>8} {'variant':<24} {'ms/step':>9} {'x plain':>8} {'ms/token':>9} "
          f"{'draft ms':>9} {'draft x plain':>13}")
    for r in rows:
        draft_ms = r.get("draft_ms_per_step")
        print(f"{r['context']:>8} {r['variant']:<24} {r['step_ms']:>9.2f} "
              f"{r['x_plain_step']:>8.2f} {r['per_token_ms']:>9.2f} "
              f"{'-' if draft_ms is None else f'{draft_ms:.2f}':>9} "
              f"{r.get('draft_x_plain_step', float('nan')):>13.2f}")
    with open(os.path.join(out, "step_cost.json"), "w") as f:
        json.dump({**meta, "rows": rows, "failed": failed}, f, indent=2)
    _plot(rows, os.path.join(out, "step_cost.png"))


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:
        return
    contexts = sorted({r["context"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4 + 0.2 * len(variants)))
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        values = [next((r["step_ms"] for r in rows if r["context"] == c
                        and r["variant"] == name), float("nan")) for c in contexts]
        ax.bar([j + i * width for j in range(len(contexts))], values, width, label=name)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(contexts))])
    ax.set_xticklabels([f"{c // 1024}k" for c in contexts])
    ax.set_ylabel("ms per step (one request)")
    ax.set_title("LongSpec step vs plain decode step")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
