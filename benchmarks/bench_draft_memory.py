"""Draft memory per request vs context length: LongSpec's ring buffer against vLLM's
`draft_model` method (a one-layer draft whose KV lives in vLLM's paged cache).

LongSpec: a DraftKVRing row is allocated on the device and filled with a request's last
`window` committed tokens at each context length; the bytes are measured with the device
allocator (CUDA) or counted from the tensors (CPU). draft_model: the bytes vLLM's own
FullAttentionSpec allocates for one layer at that length.

    python -m vllm_longspec_benchmarks.bench_draft_memory --out bench_out
    vllm-longspec bench memory --out bench_out
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SHAPES = {  # name: (num_kv_heads, head_dim, dtype) of the target's attention
    "Qwen2.5-Coder-1.5B": (2, 128, torch.bfloat16),
    "Llama-3-8B": (8, 128, torch.bfloat16),
}
LENGTHS = (4096, 32768, 131072)


def longspec_bytes_per_request(num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                               length: int, window: int, device: str) -> int:
    from vllm_longspec.draft.ring_cache import DraftKVRing

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    ring = DraftKVRing(1, window, num_kv_heads, head_dim, dtype, device)
    row = ring.rows(["req"], keep={"req"})[0]
    start = max(0, length - window)
    positions = torch.arange(start, length, device=device)
    kv = torch.randn(len(positions), num_kv_heads, head_dim, device=device).to(dtype)
    ring.write(torch.full_like(positions, row), positions, kv, kv)
    ring.mark_filled("req", length)
    if device == "cuda":
        del kv, positions
        torch.cuda.synchronize()
        measured = torch.cuda.memory_allocated() - before
    else:
        measured = ring.nbytes
    del ring
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from vllm_longspec.compat.vllm_api import full_attention_kv_bytes

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name, (heads, dim, dtype) in SHAPES.items():
        for length in LENGTHS:
            rows.append({
                "target": name, "context": length,
                "longspec_bytes": longspec_bytes_per_request(heads, dim, dtype, length,
                                                             args.window, args.device),
                "draft_model_1layer_bytes": full_attention_kv_bytes(heads, dim, dtype, length),
            })
    print(f"draft KV memory per request (device {args.device}, window {args.window})")
    print(f"{'target':<20}{'context':>9}{'LongSpec':>14}{'draft_model (1 layer)':>24}")
    for r in rows:
        print(f"{r['target']:<20}{r['context']:>9}{r['longspec_bytes'] / 2**20:>11.2f} MiB"
              f"{r['draft_model_1layer_bytes'] / 2**20:>21.2f} MiB")
    with open(os.path.join(args.out, "draft_memory.json"), "w") as f:
        json.dump({"device": args.device, "window": args.window, "rows": rows}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in SHAPES:
        sel = [r for r in rows if r["target"] == name]
        xs = [r["context"] for r in sel]
        ax.plot(xs, [r["longspec_bytes"] / 2**20 for r in sel], "o-", label=f"LongSpec, {name}")
        ax.plot(xs, [r["draft_model_1layer_bytes"] / 2**20 for r in sel], "s--",
                label=f"draft_model 1 layer, {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("draft KV bytes per request (MiB)")
    ax.legend(fontsize=7)
    ax.set_title("Draft memory per request")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "draft_memory.png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
