"""The measuring child of the end-to-end benchmark: ONE engine (one method), every point.

Runs as ``python -m vllm_longspec_benchmarks.e2e_measure CONFIG RESULTS`` (the parent starts one
per method: vLLM keeps CUDA-graph pools per process, and a second engine capturing graphs in the
same process crashes). It appends one JSON line per event to RESULTS as soon as it is known --
``engine`` (after start-up), ``point`` (one per point, or the point's error), ``memory``, ``done``
-- so that a crash or a timeout loses only what was not measured yet.

Per point (prompts, batch B, temperature T, N = max_tokens):
  1. the prompts once with max_tokens=1 (fills the prefix cache);
  2. best of R runs with max_tokens=1 -> t1 (prefill is a cache hit: one forward);
  3. best of R runs with max_tokens=N+1 -> tN, stepping the engine and timestamping each
     request's new tokens; vLLM's spec-decode counters read around these runs;
  decode tok/s = N*B / (tN - t1) (prefill and first token excluded, as in the peers' notes).
  nospec at T=0 also runs the prompts once more with logprobs=2 (the top-2 gaps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from .e2e_probe import PROBE


@dataclass
class BatchRun:
    seconds: float
    token_ids: list[list[int]]
    arrivals: list[list[tuple[float, int]]]  # per request: (seconds since start, tokens so far)
    logprobs: list[Any] | None = None


def run_batch(engine: Any, prompts: list[list[int]], params: Any, tag: str) -> BatchRun:
    """All `prompts` at once through ``LLMEngine.step()`` (what ``LLM.generate`` does), with a
    timestamp each time a request's output grows."""
    from vllm.inputs import TokensPrompt

    index: dict[str, int] = {}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        rid = f"{tag}-{i}"
        index[rid] = i
        index[str(engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params))] = i
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]
    final: list[Any] = [None] * len(prompts)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            i = index[out.request_id]
            n = len(out.outputs[0].token_ids)
            if not arrivals[i] or arrivals[i][-1][1] != n:
                arrivals[i].append((now, n))
            if out.finished:
                final[i] = out
    seconds = time.perf_counter() - start
    return BatchRun(seconds, [list(o.outputs[0].token_ids) for o in final], arrivals,
                    [o.outputs[0].logprobs for o in final])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_stats(arrivals: list[list[tuple[float, int]]]) -> dict[str, Any]:
    """After each request's first token: per-token latency (a step's gap split over the tokens
    it delivered) and per-step gap, p50/p90 in ms; tokens per decode step."""
    per_token, per_step, tokens, steps = [], [], 0, 0
    for seq in arrivals:
        for (t0, n0), (t1, n1) in zip(seq, seq[1:]):
            gap, new = t1 - t0, n1 - n0
            per_step.append(gap * 1e3)
            per_token += [gap * 1e3 / new] * new
            tokens += new
            steps += 1
    return {"token_latency_ms": {"p50": percentile(per_token, 0.5),
                                 "p90": percentile(per_token, 0.9)},
            "step_latency_ms": {"p50": percentile(per_step, 0.5),
                                "p90": percentile(per_step, 0.9)},
            "tokens_per_step": tokens / steps if steps else None}


def top2_gaps(logprobs: list[Any] | None) -> list[float | None]:
    """Per position: logprob(rank 1) - logprob(rank 2) of the target, rounded to 1e-4."""
    gaps: list[float | None] = []
    for entry in logprobs or []:
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        gaps.append(round(ranked[0].logprob - ranked[1].logprob, 4) if len(ranked) > 1
                    else None)
    return gaps


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    delta = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens",
                                                "num_accepted_tokens")}
    acc_b, acc_a = before.get("accepted_per_pos") or [], after.get("accepted_per_pos") or []
    acc_b = acc_b + [0] * (len(acc_a) - len(acc_b))
    delta["accepted_per_pos"] = [a - b for a, b in zip(acc_a, acc_b)]
    return delta


def measure_point(llm: Any, point: dict[str, Any], cfg: dict[str, Any], tag: str
                  ) -> dict[str, Any]:
    from vllm import SamplingParams

    from vllm_longspec.compat.vllm_api import engine_counters

    engine, prompts, n = llm.llm_engine, point["prompts"], cfg["max_tokens"]
    repeats = cfg["repeats"]

    def params(max_tokens: int, logprobs: int | None = None) -> Any:
        return SamplingParams(temperature=point["temperature"], max_tokens=max_tokens,
                              ignore_eos=True, detokenize=False, logprobs=logprobs)

    run_batch(engine, prompts, params(1), f"{tag}-fill")
    t1 = min(run_batch(engine, prompts, params(1), f"{tag}-t1-{r}").seconds
             for r in range(repeats))
    before = engine_counters(llm)
    runs = [run_batch(engine, prompts, params(n + 1), f"{tag}-tn-{r}") for r in range(repeats)]
    delta = counter_delta(before, engine_counters(llm))
    best = min(runs, key=lambda r: r.seconds)
    decode_s = best.seconds - t1
    batch = len(prompts)
    row: dict[str, Any] = {
        "task": point["task"], "context": point["context"],
        "context_requested": point["context_requested"], "batch": batch,
        "temperature": point["temperature"], "sources": point["sources"],
        "windows_reused": point["reused"], "digests": point["digests"],
        "max_tokens": n, "repeats": repeats, "t1_s": t1, "tN_s": best.seconds,
        "decode_tok_s": n * batch / decode_s if decode_s > 0 else None,
        "per_request_tok_s": n / decode_s if decode_s > 0 else None,
        "counters": delta,
        "mean_acceptance_length": (1 + delta["num_accepted_tokens"] / delta["num_drafts"]
                                   if delta["num_drafts"] else None),
        **latency_stats(best.arrivals)}
    if point["temperature"] == 0:
        row["token_ids"] = best.token_ids
        row["repeats_agree"] = all(r.token_ids == best.token_ids for r in runs)
        if cfg.get("reference_logprobs"):
            ref = run_batch(engine, prompts, params(n + 1, logprobs=2), f"{tag}-lp")
            row["top2_gap"] = [top2_gaps(lp) for lp in ref.logprobs]
            row["logprob_run_agrees"] = ref.token_ids == best.token_ids
    return row


def _nvidia_smi_used_mib() -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits", "-i",
                              os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def engine_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=cfg["target"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
        enforce_eager=cfg["eager"], seed=0, max_num_seqs=cfg["max_num_seqs"],
        enable_prefix_caching=True, disable_log_stats=False, skip_tokenizer_init=True,
        gpu_memory_utilization=cfg["gpu_memory_utilization"], worker_extension_cls=PROBE)
    if cfg.get("speculative_config"):
        kwargs["speculative_config"] = cfg["speculative_config"]
    if cfg.get("additional_config"):
        kwargs["additional_config"] = cfg["additional_config"]
    kwargs.update(cfg.get("engine_args") or {})
    return kwargs


def main(config_path: str, results_path: str) -> int:
    with open(config_path) as f:
        cfg = json.load(f)
    with open(cfg["points_path"]) as f:  # shared by every method's child
        shared = json.load(f)
    cfg["points"], cfg["warmup_prompts"] = shared["points"], shared["warmup_prompts"]

    def emit(record: dict[str, Any]) -> None:
        with open(results_path, "a") as out:
            out.write(json.dumps(record) + "\n")

    import vllm
    from vllm import LLM, SamplingParams

    from vllm_longspec.compat.vllm_api import shutdown_llm

    start = time.perf_counter()
    llm = LLM(**engine_kwargs(cfg))
    startup = time.perf_counter() - start
    try:
        llm.collective_rpc("bench_reset_peak_memory")
        sched = llm.llm_engine.vllm_config.scheduler_config
        emit({"kind": "engine", "startup_s": startup, "vllm_version": vllm.__version__,
              "async_scheduling": bool(getattr(sched, "async_scheduling", False)),
              "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER")})
        # Kernels, graphs and sampling paths of every batch size, on prompts that are no
        # point's (suffix decoding caches what it sees).
        for size in sorted({len(p["prompts"]) for p in cfg["points"]}):
            for temp in sorted({p["temperature"] for p in cfg["points"]}):
                run_batch(llm.llm_engine, cfg["warmup_prompts"][:size],
                          SamplingParams(temperature=temp, max_tokens=min(16, cfg["max_tokens"]),
                                         ignore_eos=True, detokenize=False), f"warm{size}-{temp}")
        for i, point in enumerate(cfg["points"]):
            key = {k: point[k] for k in ("task", "context", "batch", "temperature")}
            try:
                emit({"kind": "point", **measure_point(llm, point, cfg, f"p{i}")})
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next point
                emit({"kind": "point", **key, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]})
        report = llm.collective_rpc("bench_report")[0]
        emit({"kind": "memory", **report, "nvidia_smi_used_mib": _nvidia_smi_used_mib()})
    finally:
        shutdown_llm(llm)
    emit({"kind": "done", "wall_s": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vllm_longspec_benchmarks.e2e_measure CONFIG RESULTS")
    sys.exit(main(sys.argv[1], sys.argv[2]))
