"""One beam-tree level expansion: PyTorch's chunked top-k against the Triton `beam_topk` (two
launches, bitonic) and its first design `beam_topk_by_extraction`, as CUDA-graph replays (the GPU
time inside the drafting graph).

Each case is (requests, level nodes, vocabulary, width). Both results are checked equal first
(values exactly, indices as sets: random log-probabilities have no ties). Needs only torch and
Triton on a CUDA machine, no vLLM.

    python -m vllm_longspec_benchmarks.bench_beam_topk --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .bench_kv_compaction import time_ms

# (requests, level nodes, vocabulary, width): LongSpec's levels (1 -> 4, 4 -> 16, 16 -> 16) over a
# pruned 32k draft vocabulary, Llama-3's 128k and Qwen2.5's 152k.
def cases(vocabs: list[int]) -> list[tuple[int, int, int, int]]:
    return [(batch, nodes, vocab, width) for vocab in vocabs for batch in (1, 4)
            for nodes, width in ((1, 4), (4, 16), (16, 16))]


def run(iters: int, chunks: list[int], out: str, vocabs: list[int]) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from vllm_longspec.engine.beam_tree import chunked_topk
    from vllm_longspec_kernels.level_topk import beam_topk, beam_topk_by_extraction

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, all_equal = [], True
    for batch, nodes, vocab, width in tqdm(cases(vocabs), desc="levels"):
        logprobs = torch.randn(batch, nodes, vocab, device="cuda", generator=gen).log_softmax(-1)
        scores = torch.randn(batch, nodes, device="cuda", generator=gen)

        def torch_level():
            return chunked_topk((scores.unsqueeze(-1) + logprobs).reshape(batch, -1), width)

        ref_best, ref_index = torch_level()

        def matches(best, index):  # values exactly, indices as sets
            return (torch.equal(best, ref_best) and torch.equal(
                index.sort(dim=1).values, ref_index.sort(dim=1).values))

        row = {"requests": batch, "nodes": nodes, "vocab": vocab, "width": width,
               "torch_us": time_ms(torch_level, iters, graph_reps=20) * 1e3, "equal": True}
        for chunk in chunks:
            def triton_level(chunk=chunk):
                return beam_topk(logprobs, scores, width, chunk=chunk)

            row["equal"] &= matches(*triton_level())
            row[f"triton_{chunk}_us"] = time_ms(triton_level, iters, graph_reps=20) * 1e3
        row["triton_us"] = min(row[f"triton_{chunk}_us"] for chunk in chunks)

        def extraction_level():
            return beam_topk_by_extraction(logprobs, scores, width)

        row["equal"] &= matches(*extraction_level())
        row["extraction_us"] = time_ms(extraction_level, iters, graph_reps=20) * 1e3
        all_equal &= row["equal"]
        rows.append(row)
        tqdm.write("ROW " + json.dumps(row))  # as measured: the first compiles are slow
        with open(os.path.join(out, "bench_beam_topk.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return {"device": torch.cuda.get_device_name(), "all_equal": all_equal,
            "chunks": chunks, "rows": rows}


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [f"B{r['requests']} {r['nodes']}x{r['vocab'] // 1000}k top{r['width']}"
              for r in rows]
    ys = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh([y - 0.27 for y in ys], [r["torch_us"] for r in rows], 0.27, label="torch (chunked)")
    ax.barh(list(ys), [r["triton_us"] for r in rows], 0.27,
            label="Triton beam_topk, bitonic (best chunk)")
    ax.barh([y + 0.27 for y in ys], [r["extraction_us"] for r in rows], 0.27,
            label="Triton, repeated max (first design)")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GPU us per level (CUDA-graph replay)")
    ax.set_title(f"Beam-tree level expansion ({report['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--vocabs", default="32768,128256,151936",
                        help="vocabulary sizes to run, comma-separated")
    parser.add_argument("--chunks", default="1024,2048,4096",
                        help="beam_topk's chunk lengths to time (the best is plotted); "
                        "the first design runs its default")
    parser.add_argument("--out", default="bench_beam_topk_out")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    chunks = [int(c) for c in args.chunks.split(",")]
    report = run(args.iters, chunks, args.out, [int(v) for v in args.vocabs.split(",")])
    print(f"\n{'requests':>8} {'nodes':>5} {'vocab':>7} {'width':>5} {'torch us':>9} "
          + " ".join(f"{f'Triton {c}':>12}" for c in chunks) + f" {'first design':>12}"
          + f" {'equal':>6}")
    for r in report["rows"]:
        print(f"{r['requests']:>8} {r['nodes']:>5} {r['vocab']:>7} {r['width']:>5} "
              f"{r['torch_us']:>9.1f} "
              + " ".join(f"{r[f'triton_{c}_us']:>12.1f}" for c in chunks)
              + f" {r['extraction_us']:>12.1f} {str(r['equal']):>6}")
    with open(os.path.join(args.out, "bench_beam_topk.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "bench_beam_topk.png"))
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
