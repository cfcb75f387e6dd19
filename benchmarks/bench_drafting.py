"""The drafting of one token tree, alone: its time, its kernels, and its bytes floor.

The engine-level `bench_step_cost` says how long a drafting step takes beside the target; this
says why. It builds the serving drafter at a real target shape (random bf16 weights: cost only)
over a random paged target cache of the given context, with no vLLM engine around it, and for
each context reports

  graph_ms     median replay of the drafting CUDA graph (what the engine runs per step)
  eager_ms     median eager call (host-bound: every kernel launched from Python)
  kernels      kernels launched per drafting step (torch profiler over one eager call)
  kernel_ms    the sum of those kernels' GPU durations (what the graph would cost with free
               launches); graph_ms - kernel_ms is what the launches and gaps between kernels cost
  floor_ms     bytes every step must read at least / HBM bandwidth: per level the draft layer's
               weights, the head's rows, and the target's last-layer K/V of the prefix
               (weights at 1 byte with --fp8)
  categories   kernel time by kind (matmul, attention, top-k, norm/rope, elementwise, copies)

    python -m vllm_longspec_benchmarks.bench_drafting --contexts 32768,131072 --draft-vocab-size 32768

On a machine without CUDA it runs the same drafting in fp32 on the CPU (no graph, no kernel
table): the smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from vllm_longspec.compat.fused_ops import FusedOps
from vllm_longspec.config import LongSpecConfig
from vllm_longspec.draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights
from vllm_longspec.draft.ring_cache import DraftKVRing
from vllm_longspec.draft.rope import rope_from_cos_sin
from vllm_longspec.engine.draft_graphs import DraftCudaGraphs, DraftInputs
from vllm_longspec.engine.draft_linear import DraftLinear
from vllm_longspec.engine.drafter import LongSpecDrafter
from vllm_longspec.engine.serving_layer import ServingDraftLayer
from vllm_longspec.engine.vocab_head import DraftVocabHead, VocabShard

try:
    from .model_shapes import SHAPES
except ImportError:  # run as a script
    from model_shapes import SHAPES

BLOCK_SIZE = 16
SHAPES_HERE = dict(SHAPES, tiny=dict(hidden_size=128, intermediate_size=256,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     vocab_size=512, rms_norm_eps=1e-6, rope_theta=10000.0))

# Kernel-name fragments of each kind (CUDA kernel names of cuBLAS/cutlass, FlashAttention,
# vLLM's _C ops and PyTorch's own).
_CATEGORIES = (
    ("attention", ("flash", "fmha", "attn")),  # before matmul: FA3's kernels are cutlass's
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "splitkreduce", "cublas")),
    ("top-k", ("topk", "top_k", "sort", "radix", "gatherTopK", "bitonic")),
    ("norm/rope", ("rms_norm", "rotary", "silu_and_mul", "act_and_mul")),
    ("softmax", ("softmax",)),
    ("copies", ("copy", "cat", "index", "gather", "scatter", "fill", "memcpy", "memset")),
)


class _CosSinRotary:
    """What `FusedOps.rope_fn` needs of vLLM's rotary module (neox-style cache [P, D])."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, dtype, device):
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        angles = torch.arange(max_pos, device=device).float()[:, None] * inv
        self.cos_sin_cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
        self.head_size = head_dim
        self.is_neox_style = True
        self._inv = inv

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):  # the torch path
        angles = position_ids.float()[..., None] * self._inv.to(position_ids.device)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def build_drafter(shape: dict[str, Any], widths: tuple[int, ...], context: int,
                  head_rows: int | None, window: int, device: torch.device,
                  dtype: torch.dtype, seed: int = 0, fp8: bool = False
                  ) -> tuple[LongSpecDrafter, DraftInputs]:
    """The serving drafter of `shape` over one request with `context` cached target tokens."""
    torch.manual_seed(seed)
    arch = DraftArchitecture.from_hf_config(shape)
    config = LongSpecConfig(draft="/unused", num_speculative_tokens=len(widths), window=window,
                            tree_widths=widths if any(w > 1 for w in widths) else None)
    drafter = LongSpecDrafter(vllm_config=None, config=config, ring_rows=2)
    with torch.device(device):
        layer = LongSpecDraftLayer(arch)
    layer = init_draft_weights(layer.to(dtype), seed=seed, std=0.02)
    ops = FusedOps.for_device(device)
    drafter.draft = ServingDraftLayer(layer, ops, fp8=fp8)
    drafter.arch = arch
    vocab = arch.vocab_size
    embedding = torch.randn(vocab, arch.hidden_size, device=device, dtype=dtype) * 0.02

    class _Target:
        pass

    target = _Target()
    target.device, target.dtype = device, dtype
    target.embed = lambda ids: embedding[ids]
    drafter.target = target
    rows = head_rows or vocab
    head = torch.randn(rows, arch.hidden_size, device=device, dtype=dtype) * 0.02
    drafter.vocab_head = DraftVocabHead(
        DraftLinear(head, fp8=fp8), VocabShard(0, rows, rows),
        token_ids=torch.arange(rows, device=device) if head_rows else None)
    rotary = _CosSinRotary(arch.head_dim, context + 64, float(shape.get("rope_theta", 1e4)),
                           dtype, device)
    drafter.rope = ops.rope_fn(rotary) or rope_from_cos_sin(rotary, arch.head_dim)
    drafter.ring = DraftKVRing(2, window, arch.num_key_value_heads, arch.head_dim, dtype,
                               device)
    drafter.ring.k.normal_()
    drafter.ring.v.normal_()
    num_blocks = -(-context // BLOCK_SIZE) + 1
    cache_k = torch.randn(num_blocks, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim,
                          device=device, dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    drafter.target_kv = lambda: (cache_k, cache_v)
    block_table = torch.arange(1, num_blocks, dtype=torch.int32).unsqueeze(0)
    inputs = DraftInputs.from_requests(roots=[7], ring_rows=[1], ring_valid=[window],
                                       root_positions=[context], prefix_lens=[context],
                                       block_table=block_table).to(device)
    return drafter, inputs


def floor_bytes(arch: DraftArchitecture, levels: int, context: int, head_rows: int,
                weight_bytes: int = 2, kv_bytes: int = 2) -> int:
    """What each drafting step reads at least: per level the layer's weights, the head's rows
    and the prefix's last-layer K/V (the ring and the scratch are negligible)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    layer = h * (q + 2 * kv) + q * h + h * q + q * h + 3 * h * i
    per_level = (layer + head_rows * h) * weight_bytes + 2 * context * kv * kv_bytes
    return per_level * levels


def kernel_table(fn) -> list[dict[str, Any]]:
    """Kernels of one call of `fn` (CUDA): name, launches, total µs, sorted by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time
    rows = [{"kernel": name, "launches": int(n), "us": round(us, 2)}
            for name, (n, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])


def categorise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        name = row["kernel"].lower()
        kind = next((k for k, keys in _CATEGORIES if any(s.lower() in name for s in keys)),
                    "elementwise/other")
        entry = out.setdefault(kind, {"launches": 0, "us": 0.0})
        entry["launches"] += row["launches"]
        entry["us"] = round(entry["us"] + row["us"], 2)
    return out


def _median_ms(fn, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shape_name: str, widths: tuple[int, ...], context: int, head_rows: int | None,
            window: int, reps: int, device: torch.device, hbm_tb_s: float,
            fp8: bool = False) -> dict[str, Any]:
    shape = SHAPES_HERE[shape_name]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    drafter, inputs = build_drafter(shape, widths, context, head_rows, window, device, dtype,
                                    fp8=fp8)
    arch = drafter.arch
    rows = head_rows or arch.vocab_size
    max_prefix = context + 64

    def eager():
        return drafter.draft_tree(inputs, max_prefix)

    with torch.inference_mode():
        eager()
        record: dict[str, Any] = {
            "shape": shape_name, "context": context, "widths": list(widths),
            "head_rows": rows, "device": str(device), "weights": "fp8" if fp8 else str(dtype),
            "eager_ms": round(_median_ms(eager, max(3, reps // 4), cuda), 3)}
        element = torch.empty((), dtype=dtype).element_size()
        floor = floor_bytes(arch, len(widths), context, rows, 1 if fp8 else element, element)
        if fp8:  # the FP8 matmul against its dequantised reference and against bf16
            linear = drafter.draft.gate_up
            x = torch.randn(16, linear.in_features, device=device, dtype=dtype)
            got, ref = linear(x).float(), linear.reference(x).float()
            record["fp8_rel_err_vs_dequantised"] = round(float(
                (got - ref).norm() / ref.norm()), 5)
        record["floor_bytes"] = floor
        record["floor_ms"] = round(floor / (hbm_tb_s * 1e12) * 1e3, 3)
        if cuda:
            graphs = DraftCudaGraphs(drafter.draft_tree, max_prefix, device)
            graphs.run(inputs)  # captures
            record["graph_ms"] = round(_median_ms(lambda: graphs.run(inputs), reps, True), 3)
            table = kernel_table(eager)
            record["kernels"] = sum(r["launches"] for r in table)
            record["kernel_ms"] = round(sum(r["us"] for r in table) / 1e3, 3)
            record["categories"] = categorise(table)
            record["top_kernels"] = table[:40]
    return record


def _plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['context'] // 1024}k" for r in records]
    x = range(len(records))
    for offset, key in ((-0.3, "graph_ms"), (-0.1, "kernel_ms"), (0.1, "floor_ms"),
                        (0.3, "eager_ms")):
        axes[0].bar([i + offset for i in x], [r.get(key, 0) for r in records], width=0.2,
                    label=key)
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("ms per drafting step")
    axes[0].set_title(f"drafting {records[0]['widths']} at {records[0]['shape']} shape")
    axes[0].legend()
    kinds = sorted({k for r in records for k in r.get("categories", {})})
    bottom = [0.0] * len(records)
    for kind in kinds:
        values = [r.get("categories", {}).get(kind, {}).get("us", 0) / 1e3 for r in records]
        axes[1].bar(list(x), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_xticks(list(x), labels)
    axes[1].set_ylabel("GPU kernel ms per step")
    axes[1].set_title("kernel time by kind")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES_HERE))
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--tree-widths", default="4,16,16,16,16")
    parser.add_argument("--draft-vocab-size", type=int, default=None,
                        help="rows of the pruned draft head (default: the whole vocabulary)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 draft weights (draft_weight_dtype='fp8')")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--hbm-tb-s", type=float, default=4.8, help="4.8 H200, 3.35 H100")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    widths = tuple(int(w) for w in args.tree_widths.split(","))
    contexts = [int(c) for c in args.contexts.split(",")]
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    records = []
    for context in tqdm(contexts, desc="contexts"):
        rec = measure(args.shape, widths, context, args.draft_vocab_size, args.window,
                      args.reps, device, args.hbm_tb_s, fp8=args.fp8)
        records.append(rec)
        tqdm.write(f"{context:>7} tokens: graph {rec.get('graph_ms', '-')} ms, eager "
                   f"{rec['eager_ms']} ms, kernels {rec.get('kernels', '-')} "
                   f"({rec.get('kernel_ms', '-')} ms of GPU time), floor {rec['floor_ms']} ms")
        for kind, entry in sorted(rec.get("categories", {}).items(), key=lambda kv: -kv[1]["us"]):
            tqdm.write(f"    {kind:>18}: {entry['launches']:>4} launches, {entry['us']:>8.1f} us")
    with open(os.path.join(args.out, "bench_drafting.json"), "w") as f:
        json.dump(records, f, indent=1)
    _plot(records, os.path.join(args.out, "bench_drafting.png"))
    print(f"wrote {args.out}/bench_drafting.json and bench_drafting.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
