"""Anchor-offset ablation (issue 6): held-out acceptance of two drafts trained identically except
``--no-anchor-offset``, at short positions and at 16k+ positions.

Reads the two ``train_summary.json`` files written by ``vllm-longspec train`` (see
``benchmarks/gpu_anchor_ablation.sh``), prints a table and writes a bar plot.

    python benchmarks/plot_anchor_ablation.py                       # the 2026-11-23b H100 run
    python benchmarks/plot_anchor_ablation.py --anchor A.json --no-anchor B.json --png out.png

"short": held-out sequences at positions 0..S-1; "long": the same sequences with the first 4
tokens (the attention sink) at 0..3 and every later token shifted by ``--eval-long-offset``
(16384 here), as in a long prompt. E[accept] = sum_x min(p_target, p_draft) (the acceptance
probability of one sampled draft token), top-1 = greedy agreement of draft and target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "h100-2026-11-23b")
METRICS = ("accept", "top1", "ce")


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
    lines.append("E[accept] over training steps (@step), final metrics at the end:")
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


def plot(runs: dict[str, dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = {"short": "short positions\n(0..1023)", "long": "16k+ positions\n(sink at 0..3)"}
    width = 0.8 / len(runs)
    for ax, metric, title in zip(axes, ("accept", "top1"),
                                 ("E[accept] (sampled draft token)", "top-1 agreement (greedy)")):
        for j, (name, summary) in enumerate(runs.items()):
            ys = [summary["eval"][pos][metric] for pos in ("short", "long")]
            xs = [i + j * width for i in range(2)]
            bars = ax.bar(xs, ys, width, label=name)
            for x, y in zip(xs, ys):
                ax.text(x, y + 0.005, f"{y:.3f}", ha="center", va="bottom", fontsize=8)
            del bars
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(2)])
        ax.set_xticklabels([labels["short"], labels["long"]])
        ax.set_title(title)
        top = max(s["eval"][p][metric] for s in runs.values() for p in ("short", "long"))
        ax.set_ylim(0, top * 1.18)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    first = next(iter(runs.values()))
    fig.suptitle(f"Anchor-offset ablation: one-layer LongSpec draft for "
                 f"{os.path.basename(first['config']['target'].rstrip('/'))}, "
                 f"{first['steps']} steps, held-out {first['eval']['short']['tokens']} tokens",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
    if plot(runs, args.png):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
