"""Anchor-offset ablation (issue 6): held-out acceptance of two drafts trained identically except
``--no-anchor-offset``, at short positions, at shifted 16k+ positions and over real long prefixes.

Reads the two ``train_summary.json`` files written by ``vllm-longspec train`` (see
``benchmarks/gpu_anchor_ablation.sh``), prints tables and writes a plot.

    python benchmarks/plot_anchor_ablation.py                       # the 2026-11-23b H100 run
    python benchmarks/plot_anchor_ablation.py --anchor A.json --no-anchor B.json --png out.png

Held-out code (metrics.py): "short" = held-out sequences at positions 0..S-1; "long" = the same
sequences with the first 4 tokens (the attention sink) at 0..3 and every later token shifted by
``--eval-long-offset`` (16384 here): the distance to the sink changes, the prefix stays short.
Real long prefixes (long_eval.py; summaries of runs with ``--eval-long-data``): "head" = the
first M tokens of each long document, "tail@L" = the M tokens before L with the real L-M-token
prefix (the draft cross-attends over all of it), "no prefix" = the same tail tokens alone at
positions 0..M-1. E[accept] = sum_x min(p_target, p_draft) (the acceptance probability of one
sampled draft token), top-1 = greedy agreement of draft and target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "h100-2026-11-23b")
KINDS = ("head", "tail", "no_prefix")


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def eval_at(summary: dict, step: int | None = None) -> dict:
    """The final evaluation, or the one recorded at `step`."""
    if step is None:
        return summary["eval"]
    for record in summary.get("eval_history", []):
        if record["step"] == step:
            return record
    raise KeyError(f"no evaluation at step {step}")


def long_lengths(runs: dict[str, dict]) -> list[int]:
    """The real long-prefix lengths every run's final evaluation has (sorted), or []."""
    sets = [set(int(n) for n in s["eval"].get("long_doc", {}).get("lengths", {}))
            for s in runs.values()]
    return sorted(set.intersection(*sets)) if sets else []


def table(runs: dict[str, dict]) -> list[str]:
    """Rows: run x position set, columns: E[accept], top-1, CE (final and per recorded step)."""
    lines = []
    first = next(iter(runs.values()))
    cfg = first["config"]
    lines.append(f"target {cfg['target']}  steps {first['steps']}  seq_len {cfg['seq_len']}  "
                 f"batch {cfg['batch_size']}  loss {cfg['loss']}  lr {cfg['lr']}  "
                 f"held-out {first['eval']['short']['tokens']} tokens  "
                 f"long offset {cfg['eval_long_offset']}")
    steps = [r["step"] for r in first.get("eval_history", [])]
    head = f"{'run':<12}{'positions':<11}" + "".join(
        f"{'@' + str(s):>9}" for s in steps) + f"{'E[accept]':>11}{'top-1':>8}{'CE':>8}"
    lines.append("Held-out code, E[accept] over training steps (@step), final metrics at the end:")
    lines.append(head)
    for name, summary in runs.items():
        for pos in ("short", "long"):
            hist = "".join(f"{eval_at(summary, s)[pos]['accept']:>9.4f}" for s in steps)
            m = summary["eval"][pos]
            lines.append(f"{name:<12}{pos:<11}{hist}{m['accept']:>11.4f}{m['top1']:>8.4f}"
                         f"{m['ce']:>8.4f}")
    names = list(runs)
    if len(names) == 2:
        a, b = (runs[n]["eval"] for n in names)
        lines.append(f"difference {names[0]} - {names[1]}:")
        for pos in ("short", "long"):
            lines.append(f"  {pos:<6} E[accept] {a[pos]['accept'] - b[pos]['accept']:+.4f}  "
                         f"top-1 {a[pos]['top1'] - b[pos]['top1']:+.4f}  "
                         f"CE {a[pos]['ce'] - b[pos]['ce']:+.4f}")
        for n in names:
            e = runs[n]["eval"]
            gap = e["long"]["accept"] - e["short"]["accept"]
            lines.append(f"  {n}: long - short E[accept] {gap:+.4f}"
                         f"  top-1 {e['long']['top1'] - e['short']['top1']:+.4f}")
    for n, s in runs.items():
        lines.append(f"{n}: anchor_offset={s['config']['anchor_offset']}  final loss "
                     f"{s['final_loss']:.4f}  train {s['train_time_s']:.0f} s  "
                     f"{s['tokens_per_s']:.0f} tok/s")
    return lines


def _group_means(long_doc: dict, kind: str, length: int) -> dict[str, float]:
    """E[accept] per document group (the name's first folder: prose, code) for one block kind."""
    groups: dict[str, list[float]] = {}
    for w in long_doc["per_window"]:
        m = w["head"] if kind == "head" else w[kind].get(str(length))
        if m is not None:
            groups.setdefault(w["name"].split("/")[0], []).append(m["accept"])
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def long_table(runs: dict[str, dict]) -> list[str]:
    """Real long prefixes: per run and length, head / tail / no-prefix E[accept] and top-1; the
    run difference at every length; per document group."""
    lengths = long_lengths(runs)
    if not lengths:
        return []
    first = next(iter(runs.values()))["eval"]["long_doc"]
    lines = [f"Real long prefixes: {first['windows']} documents, blocks of {first['tail']} tokens "
             f"(head = tokens 0..{first['tail'] - 1}; tail@L = tokens L-{first['tail']}..L-1 with "
             "the real prefix; no-prefix = those tokens alone)",
             f"{'run':<12}{'L':>7}{'docs':>6}" + "".join(
                 f"{k + ' acc':>15}{k + ' top1':>15}" for k in KINDS) + f"{'tail-head':>11}"]
    for name, s in runs.items():
        for n in lengths:
            r = s["eval"]["long_doc"]["lengths"][str(n)]
            cells = "".join(f"{r[k]['accept']:>15.4f}{r[k]['top1']:>15.4f}" for k in KINDS)
            lines.append(f"{name:<12}{n:>7}{r['windows']:>6}{cells}"
                         f"{r['tail']['accept'] - r['head']['accept']:>+11.4f}")
    names = list(runs)
    if len(names) == 2:
        a, b = (runs[x]["eval"]["long_doc"]["lengths"] for x in names)
        lines.append(f"difference {names[0]} - {names[1]} (E[accept] / top-1):")
        for n in lengths:
            cells = "  ".join(f"{k} {a[str(n)][k]['accept'] - b[str(n)][k]['accept']:+.4f} / "
                              f"{a[str(n)][k]['top1'] - b[str(n)][k]['top1']:+.4f}"
                              for k in KINDS)
            lines.append(f"  L={n:<6} {cells}")
    lines.append("E[accept] per document group (head, then tail@L):")
    for name, s in runs.items():
        long_doc = s["eval"]["long_doc"]
        heads = _group_means(long_doc, "head", 0)
        tails_by_length = {n: _group_means(long_doc, "tail", n) for n in lengths}
        for group, value in heads.items():
            tails = "  ".join(f"@{n} {tails_by_length[n].get(group, float('nan')):.4f}"
                              for n in lengths)
            lines.append(f"  {name:<12}{group:<7} head {value:.4f}  {tails}")
    return lines


def plot(runs: dict[str, dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return False
    lengths = long_lengths(runs)
    panels = 3 if lengths else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    _code_panels(runs, axes[:2] if not lengths else [axes[0]])
    if lengths:
        _long_panel(runs, axes[1], "accept", "E[accept] over real long prefixes", lengths)
        _long_panel(runs, axes[2], "top1", "top-1 over real long prefixes", lengths)
    first = next(iter(runs.values()))
    fig.suptitle(f"Anchor-offset ablation: one-layer LongSpec draft for "
                 f"{os.path.basename(first['config']['target'].rstrip('/'))}, "
                 f"{first['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _code_panels(runs: dict[str, dict], axes: list[Any]) -> None:
    """Bars: held-out code at short and shifted 16k+ positions (E[accept], then top-1)."""
    labels = ["short positions\n(0..1023)", "shifted 16k+\n(sink at 0..3)"]
    width = 0.8 / len(runs)
    metrics = (("accept", "held-out code: E[accept]"), ("top1", "held-out code: top-1"))
    for ax, (metric, title) in zip(axes, metrics):
        for j, (name, summary) in enumerate(runs.items()):
            ys = [summary["eval"][pos][metric] for pos in ("short", "long")]
            xs = [i + j * width for i in range(2)]
            ax.bar(xs, ys, width, label=name)
            for x, y in zip(xs, ys):
                ax.text(x, y + 0.005, f"{y:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(2)])
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=10)
        top = max(s["eval"][p][metric] for s in runs.values() for p in ("short", "long"))
        ax.set_ylim(0, top * 1.18)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")


def _long_panel(runs: dict[str, dict], ax: Any, metric: str, title: str,
                lengths: list[int]) -> None:
    """Lines over the block's end position: head at M, tail@L at L (solid), the same tail tokens
    without their prefix (dashed)."""
    tail = next(iter(runs.values()))["eval"]["long_doc"]["tail"]
    for j, (name, summary) in enumerate(runs.items()):
        r = summary["eval"]["long_doc"]["lengths"]
        color = f"C{j}"
        head = r[str(lengths[0])]["head"][metric]
        ax.plot([tail, *lengths], [head, *(r[str(n)]["tail"][metric] for n in lengths)],
                "o-", color=color, label=f"{name}: real prefix")
        ax.plot(lengths, [r[str(n)]["no_prefix"][metric] for n in lengths], "x--", color=color,
                alpha=0.7, label=f"{name}: same tokens, no prefix")
    ax.set_xscale("log", base=2)
    ax.set_xticks([tail, *lengths])
    ax.set_xticklabels([f"head\n{tail}", *(f"{n // 1024}k" if n >= 1024 else str(n)
                                           for n in lengths)], fontsize=8)
    ax.set_xlabel(f"end of the {tail}-token block (tokens of real prefix + block)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchor", default=os.path.join(RESULTS, "train_summary_qwen15_anchor.json"))
    p.add_argument("--no-anchor",
                   default=os.path.join(RESULTS, "train_summary_qwen15_no_anchor.json"))
    p.add_argument("--png", default=os.path.join(RESULTS, "anchor_ablation.png"))
    args = p.parse_args(argv)
    runs = {"anchor": load(args.anchor), "no-anchor": load(args.no_anchor)}
    for name, s in runs.items():
        if s.get("eval") is None or "long" not in s["eval"]:
            print(f"{name}: the summary has no final short/long evaluation", file=sys.stderr)
            return 2
    print("\n".join(table(runs)))
    lines = long_table(runs)
    if lines:
        print("\n".join(lines))
    if plot(runs, args.png):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
