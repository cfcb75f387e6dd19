"""Accepted-path KV compaction: one launch over every layer of a Llama-3-8B-sized paged cache.

The V2 runner compacts with fixed-size calls (``R x max_depth`` entries, most skipped), so the
kernel's cost when few or no entries move matters as much as its cost when they do. Checks every
case against ``compact_kv_caches_ref`` first, then prints the median time of each case and
writes a bar plot.

    python -m vllm_longspec_benchmarks.bench_kv_compaction --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

# (label, pattern, entries or requests, moving entries). "random": the V2 runner's fixed-size
# calls (requests x tree depth 5; or 68 deep, the deepest chain row, as V2 called before) with
# moves between random slots of the whole cache. "paths": as in the engine, each request's
# accepted 5-deep path moves next to its root inside the request's own 69 tree slots.
CASES: list[tuple[str, str, int, int]] = [
    ("1 req x 5, none move", "random", 5, 0),
    ("1 req x 5, 5 move", "random", 5, 5),
    ("8 req x 5, 40 move", "random", 40, 40),
    ("64 req x 5, 320 move", "random", 320, 320),
    ("1 req x 68, 5 move", "random", 68, 5),
    ("8 req x 68, 40 move", "random", 544, 40),
    ("1 req, path", "paths", 1, 0),
    ("8 req, paths", "paths", 8, 0),
    ("16 req, paths", "paths", 16, 0),
    ("32 req, paths", "paths", 32, 0),
    ("64 req, paths", "paths", 64, 0),
    ("256 req, paths", "paths", 256, 0),
]
TREE_NODES, TREE_DEPTH = 69, 5


def make_caches(args: argparse.Namespace, device: Any) -> list[Any]:
    """Per-layer caches in vLLM 0.26's FlashAttention layout (logical [blocks, heads, block,
    2*D], memory order [blocks, block, heads, 2*D])."""
    import torch

    caches = []
    for _ in range(args.layers):
        physical = torch.randn(args.num_blocks, args.block_size, args.kv_heads,
                               2 * args.head_size, device=device, dtype=torch.bfloat16)
        caches.append(physical.permute(0, 2, 1, 3))
    return caches


def make_pairs(entries: int, moving: int, total_slots: int, generator: Any,
               device: Any) -> tuple[Any, Any]:
    """``moving`` entries with unique destinations (some overlapping sources, like a tree path
    moving next to its root); the rest are -1."""
    import torch

    src = torch.full((entries,), -1, dtype=torch.int64)
    dst = torch.full((entries,), -1, dtype=torch.int64)
    if moving:
        where = torch.randperm(entries, generator=generator)[:moving]
        slots = torch.randperm(total_slots, generator=generator)[:2 * moving]
        dst[where] = slots[:moving]
        src[where] = torch.cat([slots[moving + 1:], slots[:1]])  # one source is a destination
    return src.to(device), dst.to(device)


def make_path_pairs(requests: int, total_slots: int, generator: Any, device: Any
                    ) -> tuple[Any, Any]:
    """Fixed-size ``requests x TREE_DEPTH`` pairs as the V2 runner makes them: request r's tree
    sits in ``TREE_NODES`` consecutive slots of its own; its accepted path (BFS indices rising
    with depth, node at depth d >= d) moves node d's K/V to the slot of chain position d, -1
    where a node already sits there."""
    import torch

    regions = torch.randperm(total_slots // 128, generator=generator)[:requests] * 128
    src = torch.full((requests, TREE_DEPTH), -1, dtype=torch.int64)
    dst = torch.full((requests, TREE_DEPTH), -1, dtype=torch.int64)
    for r in range(requests):
        nodes = torch.randperm(TREE_NODES - 1, generator=generator)[:TREE_DEPTH] + 1
        nodes = nodes.sort().values                  # 5 distinct BFS indices, rising
        depth = torch.arange(1, TREE_DEPTH + 1)
        moves = nodes != depth
        src[r, moves] = regions[r] + nodes[moves]
        dst[r, moves] = regions[r] + depth[moves]
    return src.reshape(-1).to(device), dst.reshape(-1).to(device)


def time_ms(fn: Any, iters: int, graph_reps: int = 0) -> float:
    """Median ms of one call. With ``graph_reps``, of ``graph_reps`` calls captured in a CUDA
    graph (divided back): the kernel's GPU time without the host's launch, which for a kernel
    this small is most of an eager call's wall time."""
    import torch

    fn()
    torch.cuda.synchronize()
    run, per = fn, 1
    if graph_reps:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(graph_reps):
                fn()
        run, per = graph.replay, graph_reps
        run()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from vllm_longspec_kernels import build_kv_cache_table, compact_kv_caches, compact_kv_caches_ref

    device = torch.device("cuda")
    caches = make_caches(args, device)
    table = build_kv_cache_table(caches, "flash")
    total_slots = args.num_blocks * args.block_size
    generator = torch.Generator().manual_seed(0)
    rows, ok = [], True
    for label, pattern, size, moving in tqdm(CASES, desc="compaction cases"):
        if pattern == "paths":
            src, dst = make_path_pairs(size, total_slots, generator, device)
            entries, moving = src.shape[0], int((src >= 0).sum())
        else:
            src, dst = make_pairs(size, moving, total_slots, generator, device)
            entries = size
        # correctness on two layers' copies (the reference is slow on all of them)
        few = [c.clone() for c in caches[:2]]
        expected = [c.clone() for c in few]
        compact_kv_caches_ref(expected, src, dst, layout="flash")
        compact_kv_caches(few, src, dst, layout="flash")
        correct = all(torch.equal(a, b) for a, b in zip(few, expected))
        ok &= correct
        del few, expected
        call = lambda: compact_kv_caches(table, src, dst)  # noqa: E731
        gpu_ms = time_ms(call, args.iters, graph_reps=20)
        eager_ms = time_ms(call, args.iters)
        moved_bytes = moving * args.layers * 2 * args.kv_heads * args.head_size * 2 * 2
        rows.append({"case": label, "pattern": pattern, "entries": entries, "moving": moving,
                     "kernel_us": gpu_ms * 1e3, "eager_call_us": eager_ms * 1e3,
                     "moved_MB": moved_bytes / 1e6, "correct": correct})
    return {"layers": args.layers, "kv_heads": args.kv_heads, "head_size": args.head_size,
            "block_size": args.block_size, "num_blocks": args.num_blocks,
            "device": torch.cuda.get_device_name(), "all_correct": ok, "rows": rows}


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("(matplotlib missing: no plot; rerun with --plot-from the JSON)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["case"] for r in report["rows"]]
    values = [r["kernel_us"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(labels, values)
    ax.set_xlabel("GPU time (us, CUDA-graph replay), all layers in one launch")
    ax.set_title(f"KV compaction, {report['layers']} layers x {report['kv_heads']} KV heads x "
                 f"{report['head_size']} ({report['device']})", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=8192, help="per layer (128k tokens)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="bench_kv_compaction_out")
    parser.add_argument("--plot-from", default=None, help="a JSON of an earlier run: plot it only")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), os.path.join(args.out, "bench_kv_compaction.png"))
        return 0
    report = run(args)
    print(f"\n{'case':<26} {'GPU us':>8} {'eager call us':>14} {'moved MB':>9} {'correct':>8}")
    for row in report["rows"]:
        print(f"{row['case']:<26} {row['kernel_us']:>8.1f} {row['eager_call_us']:>14.1f} "
              f"{row['moved_MB']:>9.2f} {str(row['correct']):>8}")
    with open(os.path.join(args.out, "bench_kv_compaction.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, "bench_kv_compaction.png"))
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
