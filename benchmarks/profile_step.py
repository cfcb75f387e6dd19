"""Where one decode step's time goes: host work, GPU kernels and launches, per phase.

Runs one engine (plain, a LongSpec chain or a LongSpec tree) on one long request, then profiles
a few decode steps with ``torch.profiler`` (CPU + CUDA). Phases are marked by wrapping vLLM's
and the plugin's step functions in ``record_function`` ranges *from here* (the plugin itself
carries no profiling code). For every phase it prints, per step: calls, host (CPU) ms inclusive,
GPU kernel ms inclusive, kernel launches and torch ops. It also writes the chrome trace.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m vllm_longspec_benchmarks.profile_step \\
        --shape qwen2.5-1.5b --context 16384 --variant tree --out prof_out

Use ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so that the engine core and the worker run in this
process (the ranges then cover everything).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib
import json
import os
import shutil
import time
from typing import Any, Callable

from vllm_longspec.config import DRAFT_WEIGHT_DTYPES

from .model_shapes import shape_folder, untrained_draft

# (module, attribute path, phase name). Missing ones (another vLLM version, the other runner)
# are skipped.
PHASES: list[tuple[str, str, str]] = [
    ("vllm.v1.engine.core", "EngineCore.step", "engine_step"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "update_from_output"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", "execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", "update_states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", "prepare_inputs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward", "model_forward"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens", "sample_tokens"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample", "sample"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync", "bookkeeping_sync"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.propose_draft_token_ids", "propose"),
    ("vllm_longspec.engine.tree_step", "TreeVerifier.after_prepare_inputs", "ls.tree_plan"),
    ("vllm_longspec.engine.tree_step", "TreeVerifier.after_sample", "ls.tree_accept+compact"),
    ("vllm_longspec.engine.tree_step", "TreeVerifier._compact", "ls.compact"),
    ("vllm_longspec.engine.tree_step", "accept_trees", "ls.accept_trees"),
    ("vllm_longspec.engine.verify_attention", "tree_rows_attention", "ls.tree_rows_attention"),
    ("vllm_longspec.engine.proposer", "LongSpecProposer._update_ring", "ls.ring_update"),
    ("vllm_longspec.engine.proposer", "LongSpecProposer._draft_tree", "ls.draft_tree"),
    ("vllm_longspec.engine.proposer", "LongSpecProposer._hand_over_trees", "ls.hand_over"),
    # Model Runner V2 (vLLM's default on CUDA) and LongSpec's V2 speculator
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.execute_model", "v2.execute_model"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs", "v2.prepare_inputs"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample_tokens", "v2.sample_tokens"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample", "v2.sample"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_attn", "v2.prepare_attn"),
    ("vllm_longspec.engine.device_proposer", "DeviceProposer.propose", "ls.v2_propose"),
    ("vllm_longspec.engine.v2_tree", "TreeSlots.record", "ls.v2_tree_record"),
    ("vllm_longspec.engine.v2_tree", "prepare_tree_step", "ls.v2_prepare_tree_step"),
    ("vllm_longspec.compat.v2_tree_sampler", "TreeRejectionSampler.__call__", "ls.v2_tree_accept"),
    ("vllm_longspec.engine.tree_step", "KVPathCompactor.__call__", "ls.kv_compact"),
    ("vllm_longspec.draft.model", "LongSpecDraftLayer.forward", "ls.draft_layer"),
    ("vllm_longspec.engine.drafter", "attend_paged_prefix", "ls.draft_cross_attention"),
    ("vllm_longspec.engine.drafter", "grouped_ring_self_attention", "ls.draft_self_attention"),
    ("vllm_longspec.engine.vocab_head", "DraftVocabHead.expand_level", "ls.expand_level"),
]


def _annotated(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def annotate_phases() -> list[str]:
    """Wraps every importable phase function; returns the phases found."""
    found = []
    for module_name, path, name in PHASES:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, attr):
            continue
        setattr(owner, attr, _annotated(getattr(owner, attr), name))
        found.append(name)
    return found


def summarize(events: Any, phases: list[str], steps: int) -> list[dict[str, Any]]:
    """Per phase, per step: calls, host ms, GPU kernel ms, kernel launches, torch ops."""

    def walk(event: Any) -> tuple[int, int]:
        kernels, ops = len(event.kernels), 0
        for child in event.cpu_children:
            k, o = walk(child)
            kernels, ops = kernels + k, ops + o + (0 if child.name in phases else 1)
        return kernels, ops

    rows = {name: dict(phase=name, calls=0, host_ms=0.0, gpu_ms=0.0, launches=0, ops=0)
            for name in phases}
    for event in events:
        row = rows.get(event.name)
        if row is None or event.device_type.name != "CPU":  # not the GPU-side annotation
            continue
        kernels, ops = walk(event)
        row["calls"] += 1
        row["host_ms"] += event.cpu_time_total / 1e3
        row["gpu_ms"] += event.device_time_total / 1e3
        row["launches"] += kernels
        row["ops"] += ops
    out = []
    for row in rows.values():
        if row["calls"]:
            out.append({k: (v / steps if isinstance(v, (int, float)) and k != "phase" else v)
                        for k, v in row.items()})
    return out


def top_ops(events: Any, steps: int, limit: int = 30) -> list[dict[str, Any]]:
    """The torch ops that cost the most host time (self), per step."""
    table: dict[str, dict[str, float]] = {}
    for event in events:
        if event.name.startswith(("ls.", "engine_step")) or event.device_type.name != "CPU":
            continue
        row = table.setdefault(event.name, {"count": 0, "self_host_ms": 0.0, "gpu_ms": 0.0})
        row["count"] += 1
        row["self_host_ms"] += event.self_cpu_time_total / 1e3
        row["gpu_ms"] += event.self_device_time_total / 1e3
    ranked = sorted(table.items(), key=lambda kv: -kv[1]["self_host_ms"])[:limit]
    return [{"op": name, **{k: v / steps for k, v in row.items()}} for name, row in ranked]


KERNEL_FAMILIES: list[tuple[str, tuple[str, ...]]] = [  # first match wins
    ("attention: FlashAttention", ("flash", "fmha")),
    ("attention: LSE merge", ("merge_attn",)),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv", "splitk")),
    ("top-k / sort", ("topk", "top_k", "sort", "radix")),  # top_k: level_topk's kernels
    ("torch: elementwise, index, reduce", ("at::native",)),
    ("vLLM CUDA ops: norm, rope, quant, cache write", ("vllm::",)),
]


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, needles in KERNEL_FAMILIES:
        if any(needle in lowered for needle in needles):
            return family
    if not lowered.startswith("void ") and "::" not in lowered:
        return "Triton (LongSpec, vLLM, Inductor)"
    return "other"


def kernel_table(trace: dict[str, Any], steps: int, limit: int = 40) -> dict[str, Any]:
    """GPU kernels per step from a chrome trace: by name and by family, plus the GPU's busy time
    against the span it was busy in (the gaps are where the GPU waited for the host).

    The trace holds every kernel, including those replayed from CUDA graphs, which the
    profiler's event tree does not attribute to any CPU op."""
    kernels = [e for e in trace.get("traceEvents", [])
               if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"kernels": [], "families": [], "busy_ms": 0.0, "span_ms": 0.0}
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        row = by_name.setdefault(event["name"], [0, 0.0])
        row[0] += 1
        row[1] += event["dur"] / 1e3
    families: dict[str, list[float]] = {}
    for name, (count, ms) in by_name.items():
        row = families.setdefault(kernel_family(name), [0, 0.0])
        row[0] += count
        row[1] += ms
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:limit]
    return {
        "kernels": [{"kernel": name, "count": c / steps, "gpu_ms": ms / steps}
                    for name, (c, ms) in ranked],
        "families": [{"family": name, "count": c / steps, "gpu_ms": ms / steps}
                     for name, (c, ms) in sorted(families.items(), key=lambda kv: -kv[1][1])],
        "busy_ms": sum(e["dur"] for e in kernels) / 1e3 / steps,
        "span_ms": (end - start) / 1e3 / steps,
    }


def phase_kernel_time(trace: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """GPU kernel ms per step of each phase, every kernel attributed through its launch (the
    runtime call with the same correlation id) to the phase ranges around that launch: CUDA-graph
    replays count for the phase that replayed them. ``exclusive_ms``: kernels whose innermost
    phase it is; ``inclusive_ms``: also those of nested phases. Kernels launched outside every
    phase are reported as ``(outside phases)``."""
    events = trace.get("traceEvents", [])
    ranges: dict[Any, list[dict[str, Any]]] = {}
    calls: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "user_annotation" and "dur" in e:
            ranges.setdefault(e["tid"], []).append(e)
            calls[e["name"]] = calls.get(e["name"], 0) + 1
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    table: dict[str, dict[str, float]] = {}

    def row(name: str) -> dict[str, float]:
        return table.setdefault(name, {"inclusive_ms": 0.0, "exclusive_ms": 0.0, "kernels": 0})

    for kernel in events:
        if kernel.get("cat") != "kernel" or "dur" not in kernel:
            continue
        ms = kernel["dur"] / 1e3
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        around = [] if launch is None else [
            r for r in ranges.get(launch["tid"], [])
            if r["ts"] <= launch["ts"] <= r["ts"] + r["dur"]]
        if not around:
            inner = row("(outside phases)")
            inner["inclusive_ms"] += ms
            inner["exclusive_ms"] += ms
            inner["kernels"] += 1
            continue
        innermost = min(around, key=lambda r: r["dur"])
        for r in around:
            row(r["name"])["inclusive_ms"] += ms
        row(innermost["name"])["exclusive_ms"] += ms
        row(innermost["name"])["kernels"] += 1
    return [{"phase": name, **{k: v / steps for k, v in values.items()},
             "calls": calls.get(name, 0) / steps,
             "inclusive_ms_per_call": values["inclusive_ms"] / max(1, calls.get(name, 0))}
            for name, values in sorted(table.items(), key=lambda kv: -kv[1]["inclusive_ms"])]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_longspec.compat.vllm_api import engine_counters, shutdown_llm

    if args.runner != "auto":  # read by vLLM when it builds the engine config
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if args.runner == "v2" else "0"
    phases = annotate_phases()
    target = args.target or shape_folder(args.shape, args.out)
    kwargs: dict[str, Any] = dict(
        model=target, dtype=args.dtype, max_model_len=args.context + args.steps * 8 + 512,
        enforce_eager=args.eager, seed=0, max_num_seqs=4, skip_tokenizer_init=True,
        enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
        disable_log_stats=False)
    if args.target is None:
        kwargs["load_format"] = "dummy"
    if args.variant != "plain":
        draft = args.draft or untrained_draft(args.out, target)
        widths = [int(w) for w in args.tree_widths.split(",")]
        depth = len(widths) if args.variant == "tree" else args.k
        kwargs["speculative_config"] = {"method": "longspec", "model": draft,
                                        "num_speculative_tokens": depth}
        options: dict[str, Any] = {"tree_widths": widths} if args.variant == "tree" else {}
        if args.draft_vocab_size:
            options["draft_vocab_size"] = args.draft_vocab_size
        if args.draft_weight_dtype != "auto":
            options["draft_weight_dtype"] = args.draft_weight_dtype
        kwargs["additional_config"] = {"longspec": options}
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    async_scheduling = bool(engine.vllm_config.scheduler_config.async_scheduling)
    with open(os.path.join(target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    span = min(1000, vocab - 10)
    prompt = TokensPrompt(prompt_token_ids=[(7 * i + 3) % span + 5
                                            for i in range(args.context)])

    def decode(request_id: str, max_tokens: int, profiler: Any = None) -> list[float]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                detokenize=False)
        engine.add_request(request_id, prompt, params)
        times, produced, profiling = [], 0, False
        while engine.has_unfinished_requests():
            if profiler is not None and produced >= 1 and not profiling:
                profiler.start()  # decode steps only: the prefill is not profiled
                profiling = True
            start = time.perf_counter()
            outputs = engine.step()
            if produced >= 1:
                times.append(time.perf_counter() - start)
            for out in outputs:
                produced = len(out.outputs[0].token_ids)
        if profiling:
            profiler.stop()
        return times

    try:
        decode("warmup", 8)
        plain_times = decode("timed", 1 + args.steps)
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        prof = profile(activities=activities, record_shapes=False)
        profiled_times = decode("profiled", 1 + args.profile_steps, prof)
        counters = engine_counters(llm)
    finally:
        shutdown_llm(llm)
    steps = len(profiled_times)
    events = prof.events()
    trace = os.path.join(args.out, f"trace_{args.variant}.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    kernels = trace_kernel_tables(trace + ".gz", steps)
    gpu_busy = sum(e.self_device_time_total for e in events
                   if e.device_type.name == "CPU") / 1e3 / steps
    timed = sorted(plain_times)
    return {"variant": args.variant, "shape": args.shape, "context": args.context,
            "model_runner": args.runner, "async_scheduling": async_scheduling,
            "median_step_ms": timed[len(timed) // 2] * 1e3,
            "mean_step_ms": sum(timed) / len(timed) * 1e3,
            "profiled_step_ms": sum(profiled_times) / steps * 1e3,
            "gpu_kernel_ms_per_step": gpu_busy,
            "mean_acceptance_length": counters.get("mean_acceptance_length"),
            "phases": summarize(events, phases, steps), "top_ops": top_ops(events, steps),
            "gpu_kernels": kernels}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n== {report['variant']} ({report['shape']}, {report['context']} tokens, runner "
          f"{report.get('model_runner')}, async scheduling {report.get('async_scheduling')}): "
          f"median step {report['median_step_ms']:.2f} ms, mean {report['mean_step_ms']:.2f} ms "
          f"(profiled {report['profiled_step_ms']:.2f} ms), GPU kernels "
          f"{report['gpu_kernel_ms_per_step']:.2f} ms/step")
    print(f"{'phase':<28} {'calls':>6} {'host ms':>8} {'GPU ms':>8} {'launches':>9} {'ops':>7}")
    for row in report["phases"]:
        print(f"{row['phase']:<28} {row['calls']:>6.1f} {row['host_ms']:>8.2f} "
              f"{row['gpu_ms']:>8.2f} {row['launches']:>9.1f} {row['ops']:>7.1f}")
    print(f"\n{'top torch ops by self host time':<44} {'count':>7} {'host ms':>8} {'GPU ms':>8}")
    for row in report["top_ops"]:
        print(f"{row['op'][:44]:<44} {row['count']:>7.1f} {row['self_host_ms']:>8.3f} "
              f"{row['gpu_ms']:>8.3f}")
    if report.get("gpu_kernels"):
        print_kernels(report["gpu_kernels"])


def print_kernels(kernels: dict[str, Any]) -> None:
    """The tables of ``kernel_table`` (+ ``by_phase``)."""
    if kernels["kernels"]:
        print(f"\nGPU kernels (chrome trace, CUDA graphs included): busy {kernels['busy_ms']:.2f} ms "
              f"in a span of {kernels['span_ms']:.2f} ms per step")
        print(f"{'family':<44} {'count':>7} {'GPU ms':>8}")
        for row in kernels["families"]:
            print(f"{row['family']:<44} {row['count']:>7.1f} {row['gpu_ms']:>8.3f}")
        print(f"\n{'GPU time by launching phase, per step':<40} {'incl ms':>8} {'excl ms':>8} "
              f"{'kernels':>8} {'calls':>6} {'incl ms/call':>13}")
        for row in kernels.get("by_phase", []):
            print(f"{row['phase']:<40} {row['inclusive_ms']:>8.3f} {row['exclusive_ms']:>8.3f} "
                  f"{row['kernels']:>8.1f} {row['calls']:>6.2f} "
                  f"{row['inclusive_ms_per_call']:>13.3f}")
        print(f"\n{'kernel':<90} {'count':>7} {'GPU ms':>8}")
        for row in kernels["kernels"]:
            print(f"{row['kernel'][:90]:<90} {row['count']:>7.1f} {row['gpu_ms']:>8.3f}")


def trace_kernel_tables(path: str, steps: int) -> dict[str, Any]:
    """`kernel_table` of a saved trace (``trace_*.json.gz``) of ``steps`` profiled steps, with
    `phase_kernel_time` as ``by_phase``."""
    with gzip.open(path, "rt") as f:
        chrome = json.load(f)
    kernels = kernel_table(chrome, steps)
    kernels["by_phase"] = phase_kernel_time(chrome, steps)
    return kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["plain", "chain", "tree"], default="tree")
    parser.add_argument("--shape", default="qwen2.5-1.5b",
                        help="dummy-weight target shape when --target is not given")
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None, help="default: an untrained draft")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--tree-widths", default="4,16,16,16,16")
    parser.add_argument("--k", type=int, default=4, help="chain length")
    parser.add_argument("--draft-vocab-size", type=int, default=None,
                        help="draft over this many tokens (LongSpec's draft_vocab_size)")
    parser.add_argument("--draft-weight-dtype", default="auto", choices=DRAFT_WEIGHT_DTYPES,
                        help="LongSpec's draft_weight_dtype")
    parser.add_argument("--steps", type=int, default=32, help="timed steps (no profiler)")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--runner", choices=["auto", "v1", "v2"], default="auto",
                        help="vLLM model runner (VLLM_USE_V2_MODEL_RUNNER); auto: vLLM's choice")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--out", default="prof_out")
    parser.add_argument("--from-trace", default=None, metavar="TRACE_JSON_GZ",
                        help="no engine: print the kernel tables of a saved trace")
    args = parser.parse_args(argv)
    if args.from_trace:
        print(f"== {args.from_trace}, {args.profile_steps} profiled steps")
        print_kernels(trace_kernel_tables(args.from_trace, args.profile_steps))
        return 0
    os.makedirs(args.out, exist_ok=True)
    report = run(args)
    print_report(report)
    with open(os.path.join(args.out, f"profile_{args.variant}_{args.runner}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
