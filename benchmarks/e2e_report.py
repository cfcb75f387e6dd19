"""Results of the end-to-end benchmark: merging partial runs, speedups and exactness against
nospec, the markdown table and the plots. Pure functions of the results JSON (``--replot`` and
``--merge`` need no engine and no GPU)."""

from __future__ import annotations

import json
import os
from statistics import mean
from typing import Any

SCHEMA = "vllm-longspec-bench-e2e/1"
PLOTS = ("speedup_vs_context.png", "acceptance_vs_context.png", "throughput_by_batch.png")
Key = tuple[str, int, int, float]


def point_key(p: dict[str, Any]) -> Key:
    return (p["task"], int(p["context"]), int(p["batch"]), float(p["temperature"]))


def ok_points(method: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in method.get("points", []) if "error" not in p]


def merge_results(parts: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """One result from several (``--methods`` subsets, or the same method over other points):
    methods are united; a method in several parts keeps every point, a later part's point
    replacing an earlier one with the same (task, context, batch, temperature)."""
    if not parts:
        raise ValueError("nothing to merge")
    merged: dict[str, Any] = {"schema": SCHEMA, "meta": dict(parts[0]["meta"]), "methods": {},
                              "parts": []}
    for part, source in zip(parts, sources):
        if part.get("schema") != SCHEMA:
            raise ValueError(f"{source}: not a {SCHEMA} file")
        merged["parts"].append({"file": source, "meta": part["meta"]})
        for name, method in part["methods"].items():
            have = merged["methods"].get(name)
            if have is None or (have.get("status") != "ok" and not have.get("points")):
                merged["methods"][name] = json.loads(json.dumps(method))
                continue
            if method.get("status") == "skipped":
                continue
            points = {point_key(p): p for p in have.get("points", [])}
            points.update({point_key(p): p for p in method.get("points", [])})
            have["points"] = list(points.values())
            for field in ("engine", "memory", "settings"):
                have[field] = method.get(field, have.get(field))
            if method.get("status") != "ok":  # keeps the points of the parts that ran
                have["status"] = "partial" if have["points"] else method.get("status")
                have["error"] = method.get("error")
            elif have.get("status") != "ok" and not have.get("error"):
                have["status"] = "ok"
    if merged["meta"].get("device_name") is None:
        merged["meta"]["device_name"] = next(
            (p["meta"]["device_name"] for p in parts if p["meta"].get("device_name")), None)
    return merged


def derive(result: dict[str, Any], tie_gap: float = 0.1) -> dict[str, Any]:
    """Adds each point's ``speedup`` (decode tok/s over nospec's at the same point with the same
    prompts) and ``result["exactness"]`` (T=0 token ids against nospec's)."""
    base = result["methods"].get("nospec")
    ref = {point_key(p): p for p in ok_points(base)} if base else {}
    exactness: dict[str, Any] = {}
    for name, method in result["methods"].items():
        requests = identical = 0
        divergences: list[dict[str, Any]] = []
        mismatched_prompts = 0
        for p in ok_points(method):
            r = ref.get(point_key(p))
            same_prompts = r is not None and r.get("digests") == p.get("digests")
            if r is not None and not same_prompts:
                mismatched_prompts += 1
            p["speedup"] = (p["decode_tok_s"] / r["decode_tok_s"]
                            if same_prompts and p.get("decode_tok_s") and r.get("decode_tok_s")
                            else None)
            if name == "nospec" or not same_prompts or "token_ids" not in p:
                continue
            for i, (mine, theirs) in enumerate(zip(p["token_ids"], r["token_ids"])):
                requests += 1
                if mine == theirs:
                    identical += 1
                    continue
                pos = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                           min(len(mine), len(theirs)))
                gaps = (r.get("top2_gap") or [[]] * (i + 1))[i]
                gap = gaps[pos] if pos < len(gaps) else None
                divergences.append({"task": p["task"], "context": p["context"],
                                    "batch": p["batch"], "request": i, "position": pos,
                                    "top2_gap": gap,
                                    "near_tie": gap is not None and gap < tie_gap})
        if name != "nospec" and (requests or mismatched_prompts):
            exactness[name] = {
                "requests": requests, "identical": identical,
                "exact_match_rate": identical / requests if requests else None,
                "near_tie_divergences": sum(d["near_tie"] for d in divergences),
                "tie_gap": tie_gap, "divergences": divergences,
                "points_with_other_prompts": mismatched_prompts}
    result["exactness"] = exactness
    return result


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def context_label(p: dict[str, Any]) -> str:
    asked = p.get("context_requested")
    return f"{p['context']} ({asked} asked)" if asked and asked != p["context"] else str(
        p["context"])


def markdown(result: dict[str, Any]) -> str:
    """The tables: speed per (batch, temperature), latency, exactness, engines."""
    meta, methods = result["meta"], result["methods"]
    names = list(methods)
    lines = [f"# End-to-end: {meta.get('target')} on {meta.get('device_name')}", "",
             f"vLLM {meta.get('vllm_version')}, torch {meta.get('torch_version')}, "
             f"{meta.get('dtype')}, {meta.get('max_tokens')} timed tokens, {meta.get('date')}",
             ""]
    if result.get("parts"):
        lines += ["Merged from:", ""] + [f"* `{part['file']}`: `{part['meta'].get('command')}`"
                                         for part in result["parts"]] + [""]
    else:
        lines += [f"`{meta.get('command')}`", ""]
    points = {point_key(p): p for m in methods.values() for p in ok_points(m)}
    cells = {(name, point_key(p)): p for name, m in methods.items() for p in ok_points(m)}
    combos = sorted({(k[2], k[3]) for k in points})
    rows = sorted({(k[0], k[1]) for k in points})
    for batch, temp in combos:
        lines += [f"## Batch {batch}, T={temp:g}: decode tok/s · speedup vs nospec · "
                  "mean acceptance length", "",
                  "| task | prompt tokens | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for task, ctx in rows:
            key = (task, ctx, batch, temp)
            if key not in points:
                continue
            row = [task, context_label(points[key])]
            for name in names:
                p = cells.get((name, key))
                row.append("–" if p is None else
                           f"{fmt(p.get('decode_tok_s'), '.0f')} · "
                           f"{fmt(p.get('speedup'), '.2f')}× · "
                           f"{fmt(p.get('mean_acceptance_length'), '.2f')}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Per-token latency, ms (p50 / p90), and tokens per decode step", "",
              "| task | prompt tokens | batch | T | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for key in sorted(points):
        row = [key[0], context_label(points[key]), str(key[2]), f"{key[3]:g}"]
        for name in names:
            p = cells.get((name, key))
            lat = (p or {}).get("token_latency_ms") or {}
            row.append("–" if p is None else f"{fmt(lat.get('p50'), '.2f')} / "
                       f"{fmt(lat.get('p90'), '.2f')} ({fmt(p.get('tokens_per_step'), '.2f')})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Exactness at T=0: token ids against nospec on the same prompts", "",
              "| method | requests | identical | exact-match rate | divergences: position "
              "(target's top-2 logprob gap there) |", "|---|---|---|---|---|"]
    for name, ex in result.get("exactness", {}).items():
        divs = ", ".join(f"{d['task']}/{d['context']}/b{d['batch']}#{d['request']}@"
                         f"{d['position']} ({fmt(d['top2_gap'], '.3f')})"
                         for d in ex["divergences"][:12])
        more = len(ex["divergences"]) - 12
        lines.append(f"| {name} | {ex['requests']} | {ex['identical']} | "
                     f"{fmt(ex['exact_match_rate'], '.3f')} | {divs}"
                     f"{f' … (+{more})' if more > 0 else ''} |")
    lines += ["", "## Engines (memory: PyTorch allocator peak in the worker during the "
              "benchmark, which includes the preallocated KV cache; nvidia-smi: the whole "
              "device at the end)", "",
              "| method | status | start-up s | model runner | async scheduling | peak GiB | "
              "KV cache GiB | peak − KV GiB | nvidia-smi MiB | notes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        eng, mem = m.get("engine") or {}, m.get("memory") or {}
        peak, kv = mem.get("torch_max_allocated_bytes"), mem.get("kv_cache_bytes")
        status = m.get("status", "?")
        if m.get("skip_reason") or m.get("error"):
            why = " ".join(str(m.get("skip_reason") or m.get("error")).split())
            status += ": " + why[:200].replace("|", "/")
        failed = sum("error" in p for p in m.get("points", []))
        notes = list((m.get("settings") or {}).get("notes") or [])
        if failed:
            notes.append(f"{failed} point(s) failed")
        lines.append(f"| {name} | {status} | {fmt(eng.get('startup_s'), '.0f')} | "
                     f"{runner_label(mem.get('model_runner'))} | "
                     f"{eng.get('async_scheduling', '–')} | {_gib(peak)} | {_gib(kv)} | "
                     f"{_gib(peak - kv if peak is not None and kv is not None else None)} | "
                     f"{fmt(mem.get('nvidia_smi_used_mib'), '.0f')} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def short_tokens(n: int) -> str:
    """4096 -> "4k", 32511 -> "31.7k", 256 -> "256"."""
    if n < 1024:
        return str(n)
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n / 1024:.1f}k"


def runner_label(runner: str | None) -> str:
    """vLLM's model runner from its class path: V2 lives in ``vllm.v1.worker.gpu``."""
    if not runner:
        return "–"
    if ".worker.gpu.model_runner" in runner:
        return "V2"
    if ".worker.gpu_model_runner" in runner:
        return "V1"
    return runner.rsplit(".", 1)[-1]


def _series(result: dict[str, Any], name: str, metric: str, batch: int, temp: float,
            task: str | None) -> tuple[list[int], list[float]]:
    """(contexts, values) of one method: one task, or the mean over tasks (task=None)."""
    by_ctx: dict[int, list[float]] = {}
    for p in ok_points(result["methods"][name]):
        if p["batch"] == batch and p["temperature"] == temp and (task is None or
                                                                 p["task"] == task):
            if p.get(metric) is not None:
                by_ctx.setdefault(p["context"], []).append(p[metric])
    xs = sorted(by_ctx)
    return xs, [mean(by_ctx[x]) for x in xs]


def plot(result: dict[str, Any], out_dir: str) -> list[str]:
    """The three PNGs (matplotlib, Agg); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    points = [p for m in methods.values() for p in ok_points(m)]
    if not points:
        return []
    tasks = sorted({p["task"] for p in points})
    temps = sorted({p["temperature"] for p in points})
    batches = sorted({p["batch"] for p in points})
    b1 = batches[0]
    panels = tasks + (["mean over tasks"] if len(tasks) > 1 else [])
    contexts = sorted({p["context"] for p in points})
    written = []
    for fname, metric, ylabel, skip_nospec in (
            (PLOTS[0], "speedup", "decode speedup vs nospec", False),
            (PLOTS[1], "mean_acceptance_length", "mean acceptance length", True)):
        fig, axes = plt.subplots(len(temps), len(panels), squeeze=False,
                                 figsize=(4.2 * len(panels), 3.4 * len(temps)))
        for r, temp in enumerate(temps):
            for c, panel in enumerate(panels):
                ax = axes[r][c]
                for name in methods:
                    if skip_nospec and name == "nospec":
                        continue
                    xs, ys = _series(result, name, metric, b1, temp,
                                     None if panel == "mean over tasks" else panel)
                    if xs:
                        ax.plot(xs, ys, marker="o", label=name,
                                linestyle="--" if name == "nospec" else "-")
                ax.set_xscale("log", base=2)
                ax.set_xticks(contexts, [short_tokens(x) for x in contexts])
                ax.minorticks_off()
                ax.set_title(f"{panel}, batch {b1}, T={temp:g}", fontsize=9)
                ax.set_xlabel("prompt tokens")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)
        written.append(os.path.join(out_dir, fname))
    fig, axes = plt.subplots(1, len(contexts), squeeze=False, figsize=(4.2 * len(contexts), 3.4))
    for c, ctx in enumerate(contexts):
        ax = axes[0][c]
        for name in methods:
            ys, xs = [], []
            for b in batches:
                vals = [p["decode_tok_s"] for p in ok_points(methods[name])
                        if p["context"] == ctx and p["batch"] == b and p["temperature"] == temps[0]
                        and p.get("decode_tok_s")]
                if vals:
                    xs.append(b)
                    ys.append(mean(vals))
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_title(f"{ctx} prompt tokens, T={temps[0]:g} (mean over tasks)", fontsize=9)
        ax.set_xlabel("batch")
        ax.set_ylabel("decode tokens/s (all requests)")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, PLOTS[2]), dpi=110)
    plt.close(fig)
    written.append(os.path.join(out_dir, PLOTS[2]))
    return written


def write_outputs(result: dict[str, Any], out_dir: str, name: str = "e2e",
                  tie_gap: float = 0.1, plots: bool = True, quiet: bool = False
                  ) -> dict[str, str]:
    """Derives, then writes NAME.json, NAME.md and the PNGs into `out_dir`; prints the table
    unless `quiet`."""
    os.makedirs(out_dir, exist_ok=True)
    derive(result, tie_gap)
    paths = {"json": os.path.join(out_dir, f"{name}.json"),
             "markdown": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f)  # compact: token ids make an indented file ten times larger
    table = markdown(result)
    with open(paths["markdown"], "w") as f:
        f.write(table)
    if not quiet:
        print(table)
    if plots:
        try:
            for path in plot(result, out_dir):
                paths[os.path.basename(path)] = path
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)")
    return paths


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
