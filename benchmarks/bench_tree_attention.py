"""Hybrid tree attention on the GPU: one verify-attention layer at Llama-3-8B shape.

Shape: 32 query heads, 8 KV heads, head dim 128, bf16, paged KV blocks of 16 (vLLM 0.26's
FlashAttention layout). For every batch (1, 8) x context (8k, 32k, 128k) x tree (1, 16, 69, 128
nodes) it times, median over many runs (triton.testing.do_bench, L2 flushed between runs):

  hybrid          hybrid_tree_attention as it runs by default on Hopper: FlashAttention-3 over the
                  paged prefix (FA3's own num_splits) + Triton tree kernel with the fused merge
  hybrid_fa_tuned the same with fa_num_splits_heuristic's num_splits for FA3
  hybrid_triton   the split-KV Triton prefix kernel (paged_prefix_attention, its heuristic tiles
                  and splits) + the tree kernel
  hybrid_unfused  like hybrid, with a separate merge kernel
  hybrid_split    like hybrid, the prefix queries cut into sub-sequences that put FA3 on its 64-row
                  tile (split_prefix_queries; only where fa_one_warpgroup_chunk says it saves rows,
                  e.g. 69 nodes: 5 x 64 rows instead of 3 x 128; the split is computed once
                  outside the timing, as a step does once for all layers)
  hybrid_pgN      with --alt-block-sizes N: the hybrid over the same tokens in pages of N (FA3
                  reads pages that are a multiple of its key tile through TMA -- not in vLLM
                  0.26's build, measured: the outputs are bit-identical); pgN_max_diff is the
                  largest difference to the hybrid over pages of 16
  tree            the Triton tree kernel alone (the tree part's cost)
  fa_prefix       (a) FlashAttention over the prefix alone, return_softmax_lse=True (num_splits=0)
  fa_prefix_tuned FA3 over the prefix with fa_num_splits_heuristic's num_splits
  fa_prefix_split FA3 over the prefix with hybrid_split's sub-sequences
  fa_prefix_pgN   FA3 over the prefix in pages of N (--alt-block-sizes)
  triton_prefix   paged_prefix_attention alone (heuristic config)
  fa_causal       FlashAttention over prefix + the same number of tokens as a causal chain
                  (what verifying a chain of that length costs; no tree mask)
  sdpa_masked     (b) torch SDPA with an explicit [prefix | tree] boolean mask on K/V gathered and
                  GQA-expanded beforehand (gathering is not timed; skipped when it would not fit)
  hbm_floor       (c) bytes of one layer's K and V of the batch / HBM bandwidth (3.0 TB/s, the
                  issue's H100 figure; 4.8 TB/s on an H200; --hbm-tb-s)
  compute_floor   the useful attention FLOPs (4 * B * Hq * nodes * context * D) / 989 TFLOP/s
                  (H100 SXM dense bf16 peak); at 69+ nodes the prefix is compute-bound, not
                  memory-bound; roofline_floor = max(hbm_floor, compute_floor)

--prefix-sweep also times FA3 at num_splits 1, 2, 4, 8, 16, 32 and the Triton prefix kernel over
prefix_attn_sweep_configs() (short do_bench budget), and reports the best of each per shape
(fa_prefix_best, triton_prefix_best, with the winning setting).

--timing graph times every method as replays of a CUDA graph it was recorded into: the GPU time
alone, which is what verification pays inside vLLM's full CUDA graphs (the engine's default for
trees). The default, --timing eager, times calls, so a method's host time (Python wrappers,
Triton's launcher) counts wherever the GPU waits for it -- most of the time at short prefixes.

Writes a table to stdout, bench_tree_attention.json and bench_tree_attention.png to --out.

    source /tmp/vllm-env.sh
    python benchmarks/bench_tree_attention.py --check --out bench_out
    python -m vllm_longspec_benchmarks.bench_tree_attention --check --timing graph --rep-ms 40 \
        --contexts 131072 32768 8192 --out benchmarks/results/h200-2026-12-03b   # that run
    python benchmarks/bench_tree_attention.py --check --prefix-sweep --rep-ms 100 \
        --out benchmarks/results/h100-2026-11-23b                  # the 2026-11-23b run
    python -m vllm_longspec_benchmarks.bench_tree_attention --check   # when installed
    python benchmarks/bench_tree_attention.py --check-only          # correctness only
    python benchmarks/bench_tree_attention.py --sweep               # tree-kernel tile sweep
    LONGSPEC_TREE_ATTN_CONFIG=64,64,4,3 python benchmarks/bench_tree_attention.py  # force tiles
    TRITON_INTERPRET=1 python benchmarks/bench_tree_attention.py --device cpu --contexts 64 \
        --trees 1 5 --batches 1 --rep-ms 1                          # CPU plumbing dry run
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import os
import pathlib
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import torch


def _import_kernels():
    try:
        import vllm_longspec_kernels as kernels
    except ImportError:  # running from a source checkout that is not installed
        src = pathlib.Path(__file__).resolve().parents[1] / "triton_kernels"
        spec = importlib.util.spec_from_file_location(
            "vllm_longspec_kernels", src / "__init__.py", submodule_search_locations=[str(src)])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["vllm_longspec_kernels"] = kernels
        spec.loader.exec_module(kernels)
    return kernels


K = _import_kernels()

HQ, HK, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
PEAK_FLOPS = 989e12          # H100 / H200 SXM dense bf16 tensor-core peak (same chip)
MIB = 1 << 20


def hbm_bytes_per_s(device_name: str) -> float:
    """Memory bandwidth of the floor: H200 4.8 TB/s (HBM3e), otherwise the 3.0 TB/s used for the
    H100 in the issue's figures."""
    return 4.8e12 if "H200" in device_name else 3.0e12


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def tree_parents(num_nodes: int, rng: random.Random) -> list[int]:
    """A beam-like tree of num_nodes in BFS order: root, then levels of width <= 16 (LongSpec's
    69-node tree is 1 + 4 + 16 * 4); each node's parent is in the level above."""
    if num_nodes == 1:
        return [-1]
    widths = [4] + [16] * 64
    parents, prev, i = [-1], [0], 1
    for w in widths:
        if i >= num_nodes:
            break
        level = list(range(i, min(num_nodes, i + w)))
        parents += [rng.choice(prev) for _ in level]
        prev, i = level, i + len(level)
    return parents


@dataclass
class PagedBatch:
    """One batch: paged prefix cache (vLLM FlashAttention layout) + tree inputs."""

    kv: torch.Tensor                 # [num_blocks, HK, BLOCK_SIZE, 2*D] logical, NHD physical
    k_cache: torch.Tensor            # [num_blocks, BLOCK_SIZE, HK, D] view
    v_cache: torch.Tensor
    block_table: torch.Tensor        # [B, max_blocks] int32
    context: int
    batch: int
    room: int                        # tokens per request the cache can hold past the prefix
    extra: dict = field(default_factory=dict)
    block_size: int = BLOCK_SIZE

    def token_slots(self, request: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of request ``request``'s tokens at positions ``pos``, to index
        ``k_cache``/``v_cache`` with."""
        return self.block_table[request].long()[pos // self.block_size], pos % self.block_size


def _empty_paged(batch: int, tokens: int, block_size: int, device: str, seed: int):
    blocks_per_req = math.ceil(tokens / block_size)
    num_blocks = batch * blocks_per_req
    gen = torch.Generator(device=device).manual_seed(seed)
    # vLLM 0.26 FlashAttention allocation: physical [blocks, block_size, heads, 2D], handed to the
    # backend as the logical (blocks, heads, block_size, 2D) permuted view.
    phys = torch.empty(num_blocks, block_size, HK, 2 * HEAD_DIM, dtype=DTYPE, device=device)
    kv = phys.permute(0, 2, 1, 3)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    return phys, kv, perm.view(batch, blocks_per_req).contiguous(), gen


def make_cache(batch: int, context: int, room: int, device: str, seed: int,
               block_size: int = BLOCK_SIZE) -> PagedBatch:
    phys, kv, block_table, gen = _empty_paged(batch, context + room, block_size, device, seed)
    phys.normal_(generator=gen)
    k_cache, v_cache = K.split_kv_cache(kv, "flash")
    return PagedBatch(kv, k_cache, v_cache, block_table, context, batch, room,
                      block_size=block_size)


def repage(cache: PagedBatch, block_size: int, seed: int = 0) -> PagedBatch:
    """The same tokens' K and V in pages of ``block_size`` (a fresh random page order): FA3's
    source reads pages that are a multiple of its key tile (176 at head dim 128) through TMA."""
    tokens = cache.context + cache.room
    phys, kv, table, _ = _empty_paged(cache.batch, tokens, block_size, cache.kv.device, seed)
    k_new, v_new = K.split_kv_cache(kv, "flash")
    pos = torch.arange(tokens, device=cache.kv.device)
    new = PagedBatch(kv, k_new, v_new, table, cache.context, cache.batch, cache.room,
                     block_size=block_size)
    for r in range(cache.batch):
        old_slots, new_slots = cache.token_slots(r, pos), new.token_slots(r, pos)
        k_new[new_slots] = cache.k_cache[old_slots]
        v_new[new_slots] = cache.v_cache[old_slots]
    return new


def make_tree_inputs(batch: int, num_nodes: int, device: str, seed: int) -> dict:
    rng = random.Random(seed)
    parents = [tree_parents(num_nodes, rng) for _ in range(batch)]
    total = batch * num_nodes
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(DTYPE)

    return dict(
        q=randn(total, HQ, HEAD_DIM),
        tree_k=randn(total, HK, HEAD_DIM),
        tree_v=randn(total, HK, HEAD_DIM),
        cu_seqlens=torch.arange(0, total + 1, num_nodes, dtype=torch.int32, device=device),
        tree_mask=K.build_tree_mask(parents, num_words=K.tree_mask_num_words(num_nodes),
                                    device=device),
        parents=parents,
    )


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def graph_replay(fn):
    """``fn`` recorded into a CUDA graph (after warm-up on a side stream); returns its replay.

    The engine runs verification attention inside vLLM's full CUDA graphs, so the GPU time of a
    replay is what a verification step pays; eager calls add each method's host time (Python
    wrappers, Triton's launcher) wherever the GPU waits for it, which at short prefixes is most
    of an eager measurement."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_ms(fn, rep_ms: int, device: str, timing: str = "eager") -> float:
    """Median milliseconds per call (CUDA: do_bench, L2 flushed between calls); ``timing="graph"``
    times replays of ``fn`` recorded into a CUDA graph (``graph_replay``)."""
    fn()  # compile / warm up outside the measurement
    if timing == "graph" and device.startswith("cuda"):
        fn = graph_replay(fn)
    if not device.startswith("cuda"):  # CPU dry run (plumbing only; numbers are meaningless)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    torch.cuda.synchronize()
    try:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms,
                                             return_mode="median"))
    except TypeError:  # older Triton without return_mode
        pass
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(20, rep_ms)):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return 1 << 40


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def tree_tiles(batch: int, num_nodes: int):
    """The tree kernel's default tiles for this shape (they depend on the grid size)."""
    return K.default_tree_attn_config(HEAD_DIM, DTYPE, num_nodes * (HQ // HK), batch * HK)


def _tiles_text(cfg) -> str:
    return f"{cfg.block_m},{cfg.block_n},{cfg.num_warps},{cfg.num_stages}"


def hbm_floor_ms(batch: int, context: int, num_nodes: int, bytes_per_s: float) -> float:
    kv_bytes = 2 * batch * (context + num_nodes) * HK * HEAD_DIM * DTYPE.itemsize
    return kv_bytes / bytes_per_s * 1e3


def compute_floor_ms(batch: int, context: int, num_nodes: int) -> float:
    flops = 4 * batch * HQ * num_nodes * (context + num_nodes / 2) * HEAD_DIM
    return flops / PEAK_FLOPS * 1e3


def sdpa_bytes(batch: int, context: int, num_nodes: int) -> int:
    keys = context + num_nodes
    kv = 2 * batch * HQ * keys * HEAD_DIM * DTYPE.itemsize         # GQA-expanded K and V
    mask = batch * num_nodes * keys                                  # bool
    scratch = batch * HQ * num_nodes * keys * 4                      # worst case (math backend)
    return kv + mask + scratch


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def build_methods(cache: PagedBatch, tree: dict, num_nodes: int, args,
                  alts: tuple[PagedBatch, ...] = ()) -> dict:
    """Timed methods by name; each of ``alts`` (the same tokens in pages of another size N,
    ``repage``) adds ``hybrid_pg{N}`` and ``fa_prefix_pg{N}`` over it, and ``_alt_outputs``
    lists (N, default output, output over pages of N) for the max-diff check."""
    b, ctx = cache.batch, cache.context
    device = tree["q"].device
    prefix_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    scale = HEAD_DIM ** -0.5
    has_fa = device.type == "cuda" and K.flash_attn_available()
    common = dict(q=tree["q"], prefix_k_cache=cache.k_cache, prefix_v_cache=cache.v_cache,
                  block_table=cache.block_table, prefix_lens=prefix_lens,
                  tree_k=tree["tree_k"], tree_v=tree["tree_v"], cu_seqlens=tree["cu_seqlens"],
                  tree_mask=tree["tree_mask"], softmax_scale=scale, max_seqlen_q=num_nodes,
                  max_prefix_len=ctx, prefix_backend="flash" if has_fa else "torch",
                  fa_version=args.fa_version, tree_autotune=args.autotune)
    out = torch.empty_like(tree["q"])
    fa_splits = K.fa_num_splits_heuristic(b, num_nodes, ctx, HQ, HK) if has_fa else 0
    triton_cfg = K.default_prefix_attn_config(b, num_nodes, ctx, HQ, HK, HEAD_DIM, DTYPE)
    prefix_args = (tree["q"], cache.k_cache, cache.v_cache, cache.block_table, prefix_lens,
                   tree["cu_seqlens"], scale)
    chunk = K.fa_one_warpgroup_chunk(HQ, HK, num_nodes, HEAD_DIM,
                                     require_saving=not getattr(args, "force_prefix_split", False))
    split = K.split_prefix_queries(tree["cu_seqlens"], prefix_lens, cache.block_table,
                                   chunk=chunk, max_seqlen_q=num_nodes) if chunk else None
    methods = {
        "hybrid": lambda: K.hybrid_tree_attention(**common, out=out, fuse_merge=True,
                                                  fa_num_splits=0),
        "hybrid_fa_tuned": lambda: K.hybrid_tree_attention(**common, out=out,
                                                           fa_num_splits=fa_splits),
        "hybrid_triton": lambda: K.hybrid_tree_attention(**dict(common, prefix_backend="triton"),
                                                         out=out, prefix_config=triton_cfg),
        "hybrid_unfused": lambda: K.hybrid_tree_attention(**common, out=out, fuse_merge=False,
                                                          fa_num_splits=0),
        "tree": lambda: K.tree_attention(tree["q"], tree["tree_k"], tree["tree_v"],
                                         tree["cu_seqlens"], tree["tree_mask"], scale,
                                         max_seqlen=num_nodes, autotune=args.autotune),
        "triton_prefix": lambda: K.paged_prefix_attention(
            *prefix_args, max_seqlen_q=num_nodes, max_prefix_len=ctx, config=triton_cfg),
    }
    if split is not None:
        methods["hybrid_split"] = lambda: K.hybrid_tree_attention(**common, out=out,
                                                                  prefix_split=split)
    methods["_alt_outputs"] = []
    for alt in alts:
        common_alt = dict(common, prefix_k_cache=alt.k_cache, prefix_v_cache=alt.v_cache,
                          block_table=alt.block_table)
        out_alt = torch.empty_like(tree["q"])
        methods[f"hybrid_pg{alt.block_size}"] = functools.partial(
            K.hybrid_tree_attention, **common_alt, out=out_alt, fuse_merge=True, fa_num_splits=0)
        methods["_alt_outputs"].append((alt.block_size, out, out_alt))
    if not has_fa:
        return methods
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    fa_version = args.fa_version or K.default_fa_version(device.index or 0)
    chain_lens = torch.full((b,), ctx + num_nodes, dtype=torch.int32, device=device)

    def fa(seqused, max_k, causal, num_splits=0, seqs=None, paged=cache):
        extra = {"num_splits": num_splits} if num_splits and fa_version == 3 else {}
        cu_q, max_q, table = ((seqs.cu_seqlens, seqs.max_seqlen_q, seqs.block_table) if seqs
                              else (tree["cu_seqlens"], num_nodes, paged.block_table))
        return lambda: flash_attn_varlen_func(
            q=tree["q"], k=paged.k_cache, v=paged.v_cache, max_seqlen_q=max_q,
            cu_seqlens_q=cu_q, max_seqlen_k=max_k, seqused_k=seqused,
            block_table=table, softmax_scale=scale, causal=causal,
            return_softmax_lse=True, fa_version=fa_version, **extra)

    methods["fa_prefix"] = fa(prefix_lens, ctx, False)
    for alt in alts:
        methods[f"fa_prefix_pg{alt.block_size}"] = fa(prefix_lens, ctx, False, paged=alt)
    if split is not None:
        methods["fa_prefix_split"] = fa(split.prefix_lens, ctx, False, seqs=split)
    methods["fa_prefix_tuned"] = fa(prefix_lens, ctx, False, fa_splits)
    methods["fa_causal"] = fa(chain_lens, ctx + num_nodes, True)
    methods["_fa_split"] = lambda s: fa(prefix_lens, ctx, False, s)   # for --prefix-sweep
    methods["_settings"] = dict(fa_num_splits=fa_splits, triton_config=triton_cfg.short(),
                                prefix_query_chunk=chunk)
    methods["_triton_cfg"] = triton_cfg
    methods["_prefix_args"] = prefix_args
    return methods


def prefix_sweep(methods: dict, num_nodes: int, ctx: int, args, device: str) -> dict:
    """FA3 num_splits and Triton prefix configs, timed with a short do_bench budget."""
    rep = max(10, args.rep_ms // 5)
    res: dict = {"fa_splits_ms": {}, "triton_ms": {}}
    if "_fa_split" in methods:
        for s in (0, 1, 2, 4, 8, 16, 32):
            try:
                res["fa_splits_ms"][str(s)] = time_ms(methods["_fa_split"](s), rep, device)
            except Exception as exc:  # noqa: BLE001
                res["fa_splits_ms"][str(s)] = f"ERR {type(exc).__name__}"
    base = methods.get("_triton_cfg")
    if base is not None:
        for cfg in K.prefix_attn_sweep_configs(base):
            fn = lambda c=cfg: K.paged_prefix_attention(  # noqa: E731
                *methods["_prefix_args"], max_seqlen_q=num_nodes, max_prefix_len=ctx, config=c)
            try:
                res["triton_ms"][cfg.short()] = time_ms(fn, rep, device)
            except Exception as exc:  # noqa: BLE001 - some tiles may not compile/fit
                res["triton_ms"][cfg.short()] = f"ERR {type(exc).__name__}"
    for key, name in (("fa_splits_ms", "fa_prefix_best"), ("triton_ms", "triton_prefix_best")):
        timed = {k: v for k, v in res[key].items() if isinstance(v, float)}
        if timed:
            best = min(timed, key=timed.get)
            res[f"{name}_ms"], res[f"{name}_setting"] = timed[best], best
    return res


def build_sdpa(cache: PagedBatch, tree: dict, num_nodes: int):
    """Dense masked SDPA over gathered, GQA-expanded K/V (gather/expand not timed)."""
    import torch.nn.functional as F

    b, ctx = cache.batch, cache.context
    device = tree["q"].device
    pos = torch.arange(ctx, device=device)
    ks, vs = [], []
    for r in range(b):
        slots = cache.token_slots(r, pos)
        tk = tree["tree_k"][r * num_nodes:(r + 1) * num_nodes]
        tv = tree["tree_v"][r * num_nodes:(r + 1) * num_nodes]
        ks.append(torch.cat([cache.k_cache[slots], tk]))
        vs.append(torch.cat([cache.v_cache[slots], tv]))
    # [B, HQ, L + n, D]
    k = torch.stack(ks).transpose(1, 2).repeat_interleave(HQ // HK, 1).contiguous()
    v = torch.stack(vs).transpose(1, 2).repeat_interleave(HQ // HK, 1).contiguous()
    del ks, vs
    vis = K.unpack_tree_mask(tree["tree_mask"].cpu(), tree["cu_seqlens"].cpu())
    mask = torch.ones(b, 1, num_nodes, ctx + num_nodes, dtype=torch.bool, device=device)
    for r in range(b):
        mask[r, 0, :, ctx:] = vis[r].to(device)
    q = tree["q"].view(b, num_nodes, HQ, HEAD_DIM).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# Correctness on the GPU
# ---------------------------------------------------------------------------------------------


def run_check(device: str, fa_version: int | None, alt_block_sizes: list[int] = ()) -> bool:
    """Hybrid (FlashAttention prefix + Triton tree), merge and compaction vs torch references;
    every case is checked again in pages of each of ``alt_block_sizes`` (the fused FA3 and
    Triton prefix variants)."""
    ok = True
    rng = random.Random(0)
    page_sizes = [BLOCK_SIZE, *alt_block_sizes]
    cases = [  # (Hq, Hk, D, dtype, prefix lens, tree sizes)
        (32, 8, 128, torch.bfloat16, [0, 1000, 37, 2048], [69, 1, 16, 128]),
        (32, 8, 128, torch.bfloat16, [3000, 17], [40, 69]),
        (8, 2, 64, torch.float16, [513, 0, 16, 5], [1, 33, 12, 70]),
        (16, 16, 256, torch.bfloat16, [300, 129], [7, 69]),
    ]
    tol = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 2e-3)}
    for (ci, (hq, hk, d, dtype, plens, sizes)), page in itertools.product(enumerate(cases),
                                                                          page_sizes):
        gen = torch.Generator(device=device).manual_seed(ci)
        parents = [tree_parents(n, rng) if ci % 2 == 0 or n < 40 else list(range(-1, n - 1))
                   for n in sizes]
        total = sum(sizes)
        nblk = [math.ceil(p / page) for p in plens]
        num_blocks = sum(nblk) + 2
        phys = torch.randn(num_blocks, page, hk, 2 * d, generator=gen, device=device,
                           dtype=torch.float32).to(dtype)
        k_cache, v_cache = K.split_kv_cache(phys.permute(0, 2, 1, 3), "flash")
        perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
        table = torch.zeros(len(plens), max(nblk) + 1, dtype=torch.int32, device=device)
        cur = 0
        for r, n in enumerate(nblk):
            table[r, :n] = perm[cur:cur + n]
            cur += n

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device).to(dtype)

        cu = [0]
        for n in sizes:
            cu.append(cu[-1] + n)
        args = dict(q=randn(total, hq, d), prefix_k_cache=k_cache, prefix_v_cache=v_cache,
                    block_table=table,
                    prefix_lens=torch.tensor(plens, dtype=torch.int32, device=device),
                    tree_k=randn(total, hk, d), tree_v=randn(total, hk, d),
                    cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
                    tree_mask=K.build_tree_mask(parents, device=device), softmax_scale=d ** -0.5)
        ref_out, ref_lse = K.hybrid_tree_attention_ref(**args)
        variants = [(fuse, "flash", None, None) for fuse in (True, False)] + [
            (True, "flash", 3, None), (True, "triton", None, None), (False, "triton", None, None),
            (True, "triton", None, K.PrefixAttnConfig(64, 64, 4, 3, 5)),
            (True, "triton", None, K.PrefixAttnConfig(16, 128, 4, 3, 1))]
        # Any chunk checks the split path; 16 puts 4 query heads per KV head on FA3's 64-row tile.
        split = K.split_prefix_queries(args["cu_seqlens"], args["prefix_lens"], table, chunk=16,
                                       max_seqlen_q=max(sizes))
        variants = [v + (None,) for v in variants] + [(True, "flash", None, None, split),
                                                      (True, "triton", None, None, split)]
        if page != BLOCK_SIZE:
            variants = [(True, "flash", None, None, None), (True, "triton", None, None, None)]
        for fuse, backend, splits, pcfg, seqs in variants:
            if backend == "flash" and not K.flash_attn_available():
                backend = "torch"
            out = torch.full_like(args["q"], float("nan"))
            out, lse = K.hybrid_tree_attention(**args, out=out, return_lse=True, fuse_merge=fuse,
                                               fa_version=fa_version, prefix_backend=backend,
                                               fa_num_splits=splits, prefix_config=pcfg,
                                               prefix_split=seqs)
            err = (out.double() - ref_out).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().max().item()
            finite = bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
            passed = finite and err <= tol[dtype][0] and lse_err <= tol[dtype][1]
            ok &= passed
            what = f"pages of {page}, prefix={backend}" + (
                f" splits={splits}" if splits else "") + (
                f" cfg={pcfg.short()}" if pcfg else "") + (
                f" query chunks of {seqs.max_seqlen_q}" if seqs else "")
            print(f"check hybrid case {ci} Hq={hq} Hk={hk} D={d} {str(dtype)[6:]} fuse={fuse} "
                  f"{what}: max|out err|={err:.2e} max|lse err|={lse_err:.2e} finite={finite} "
                  f"{'PASS' if passed else 'FAIL'}")

    # Merge with empty sides and garbage outputs.
    pa = torch.randn(50, 32, 128, device=device, dtype=torch.bfloat16)
    pb = torch.randn(50, 32, 128, device=device, dtype=torch.bfloat16)
    la = torch.randn(32, 50, device=device)
    lb = torch.randn(32, 50, device=device)
    la[:, :5] = float("-inf")
    pa[:5] = float("nan")
    la[:, 5:8] = float("inf")
    lb[:, 10:12] = float("-inf")
    out, lse = K.merge_attn_states(pa, la, pb, lb)
    ref_out, ref_lse = K.merge_attn_states_ref(pa, la, pb, lb)
    err = (out.double() - ref_out).abs().max().item()
    passed = bool(torch.isfinite(out).all()) and err <= 2e-2 and \
        (lse.double() - ref_lse).abs().max().item() <= 1e-4
    ok &= passed
    print(f"check merge: max|out err|={err:.2e} {'PASS' if passed else 'FAIL'}")

    # Compaction over 4 layers, overlapping chain pattern, both vLLM layouts.
    for layout in ("flash", "cpu"):
        caches = [torch.randn(16, 8, 16, 256, device=device).to(torch.bfloat16) for _ in range(4)]
        if layout == "flash":
            caches = [c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in caches]
        expected = [c.clone() for c in caches]
        src = torch.tensor([40, 44, 51, 60, -1, 130, 131], dtype=torch.int32, device=device)
        dst = torch.tensor([40, 41, 42, 43, 7, 128, 129], dtype=torch.int32, device=device)
        K.compact_kv_caches_ref(expected, src, dst, layout=layout)
        K.compact_kv_caches(caches, src, dst, layout=layout)
        passed = all(torch.equal(a, b) for a, b in zip(caches, expected))
        ok &= passed
        print(f"check kv compaction ({layout}): {'PASS' if passed else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


TABLE = ["hybrid_ms", "hybrid_fa_tuned_ms", "hybrid_triton_ms", "hybrid_split_ms", "fa_prefix_ms",
         "fa_prefix_tuned_ms", "fa_prefix_split_ms", "triton_prefix_ms", "fa_prefix_best_ms",
         "triton_prefix_best_ms", "sdpa_masked_ms", "hbm_floor_ms", "roofline_floor_ms",
         "sdpa/hybrid", "sdpa/hybrid_split", "hybrid/floor", "hybrid/roofline"]


def add_ratios(row: dict) -> None:
    """Ratios of the default hybrid (FA3 prefix) to its baselines and floors, and of each prefix
    variant to FA3 over the prefix with its own num_splits."""
    new = {k: row[f"{k}_ms"] for k in ("hybrid", "hybrid_fa_tuned", "hybrid_triton",
                                       "hybrid_split")
           if isinstance(row.get(f"{k}_ms"), float)}
    if new:
        best = min(new, key=new.get)
        row["fastest_hybrid"], row["fastest_hybrid_ms"] = best, new[best]
    row["roofline_floor_ms"] = max(row["hbm_floor_ms"], row["compute_floor_ms"])
    for key, num, den in (("hybrid/fa_prefix", "hybrid_ms", "fa_prefix_ms"),
                          ("hybrid/floor", "hybrid_ms", "hbm_floor_ms"),
                          ("hybrid/roofline", "hybrid_ms", "roofline_floor_ms"),
                          ("sdpa/hybrid", "sdpa_masked_ms", "hybrid_ms"),
                          ("sdpa/hybrid_split", "sdpa_masked_ms", "hybrid_split_ms"),
                          ("hybrid_split/hybrid", "hybrid_split_ms", "hybrid_ms"),
                          ("fa_prefix_split/fa_prefix", "fa_prefix_split_ms", "fa_prefix_ms"),
                          ("hybrid_triton/hybrid", "hybrid_triton_ms", "hybrid_ms"),
                          ("hybrid_fa_tuned/hybrid", "hybrid_fa_tuned_ms", "hybrid_ms"),
                          ("triton_prefix/fa_prefix", "triton_prefix_ms", "fa_prefix_ms"),
                          ("fa_prefix_tuned/fa_prefix", "fa_prefix_tuned_ms", "fa_prefix_ms"),
                          ("fa_prefix_best/fa_prefix", "fa_prefix_best_ms", "fa_prefix_ms"),
                          ("triton_prefix_best/fa_prefix", "triton_prefix_best_ms",
                           "fa_prefix_ms")):
        if isinstance(row.get(num), float) and isinstance(row.get(den), float):
            row[key] = row[num] / row[den]
    for pg in sorted(k[len("hybrid_pg"):-3] for k in row
                     if k.startswith("hybrid_pg") and k.endswith("_ms")):
        for key, num, den in ((f"hybrid_pg{pg}/hybrid", f"hybrid_pg{pg}_ms", "hybrid_ms"),
                              (f"sdpa/hybrid_pg{pg}", "sdpa_masked_ms", f"hybrid_pg{pg}_ms"),
                              (f"fa_prefix_pg{pg}/fa_prefix", f"fa_prefix_pg{pg}_ms",
                               "fa_prefix_ms")):
            if isinstance(row.get(num), float) and isinstance(row.get(den), float):
                row[key] = row[num] / row[den]


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_table(rows: list[dict]) -> None:
    paged = sorted({c for r in rows for c in r if c.startswith(("hybrid_pg", "fa_prefix_pg",
                                                                   "sdpa/hybrid_pg", "pg"))})
    cols = ["batch", "context", "tree"] + [c for c in TABLE if any(c in r for r in rows)] + paged
    widths = [max(len(c.replace("_ms", "")), 7) for c in cols]
    print("times in ms; hybrid = the default (FA3 prefix, its own num_splits); *_best = fastest "
          "swept setting; floor = HBM floor; roofline = max(HBM, compute floor)")
    print("  ".join(c.replace("_ms", "").rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "-")).rjust(w) for c, w in zip(cols, widths)))


def plot(rows: list[dict], path: str) -> bool:
    """Top: ms per layer vs context (hybrid solid, hybrid with the Triton prefix dash-dot, FA3
    prefix alone dashed, masked SDPA dotted, HBM floor black). Bottom: prefix speed-up over FA3
    (num_splits=0) per shape: the tuned FA3 call, the Triton kernel, the best swept settings."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the PNG")
        return False
    batches = sorted({r["batch"] for r in rows})
    trees = sorted({r["tree"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(7 * len(batches), 9.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, b in zip(axes[0], batches):
        for i, t in enumerate(trees):
            sel = sorted((r for r in rows if r["batch"] == b and r["tree"] == t),
                         key=lambda r: r["context"])
            xs = [r["context"] for r in sel]
            for key, style, label in (("hybrid_ms", "-o", f"hybrid, {t} nodes"),
                                      ("hybrid_triton_ms", "-.", None),
                                      ("hybrid_split_ms", "-s", None),
                                      *((k, "-^", None) for k in sorted(
                                          {c for r in sel for c in r if c.startswith("hybrid_pg")
                                           and c.endswith("_ms")})),
                                      ("fa_prefix_ms", "--", None),
                                      ("sdpa_masked_ms", ":x", None)):
                pts = [(x, r[key]) for x, r in zip(xs, sel) if isinstance(r.get(key), float)]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[i % len(colors)], label=label)
        floor = sorted({(r["context"], r["hbm_floor_ms"]) for r in rows
                        if r["batch"] == b and r["tree"] == trees[0]})
        ax.plot(*zip(*floor), "k:", label="HBM floor (3.0 TB/s)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per layer")
        ax.set_title(f"batch {b}: solid hybrid (FA3 prefix), -s- with 64-row query tiles, "
                     "dash-dot hybrid (Triton prefix),\ndashed FA3 prefix alone, dotted x masked "
                     "SDPA; -^ hybrid over pages of --alt-block-sizes", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax, b in zip(axes[1], batches):
        sel = sorted((r for r in rows if r["batch"] == b), key=lambda r: (r["context"], r["tree"]))
        labels = [f"{r['context'] // 1024}k/{r['tree']}" for r in sel]
        series = [("fa_prefix_tuned_ms", "FA3 fa_num_splits_heuristic"),
                  ("fa_prefix_split_ms", "FA3, queries split into 64-row tiles"),
                  ("triton_prefix_ms", "Triton split-KV (heuristic config)"),
                  ("fa_prefix_best_ms", "FA3 best swept num_splits"),
                  ("triton_prefix_best_ms", "Triton best swept config")]
        series = [(k, n) for k, n in series if any(isinstance(r.get(k), float) for r in sel)]
        width = 0.8 / max(1, len(series))
        for j, (key, name) in enumerate(series):
            ys = [r["fa_prefix_ms"] / r[key] if isinstance(r.get(key), float)
                  and isinstance(r.get("fa_prefix_ms"), float) else 0.0 for r in sel]
            ax.bar([i + j * width for i in range(len(sel))], ys, width, label=name,
                   color=colors[j % len(colors)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))])
        ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_ylabel("prefix speed-up vs FA3 (num_splits=0)")
        ax.set_title(f"batch {b}: prefix kernels (context/tree nodes)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Hybrid tree attention, Llama-3-8B layer (32q/8kv heads, d=128, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


RATIO_KEYS = ("best_hybrid", "best_hybrid_ms", "best/old", "sdpa/best", "sdpa/old", "best/floor",
              "best/roofline")   # written by the 2026-11-23b run's first version of this script


def replot(path: str) -> int:
    """Re-derives ratios, table and PNG from a saved bench_tree_attention.json (in place).
    Rows of the 2026-11-23b run call the FA3-with-fa_num_splits_heuristic hybrid "hybrid_auto"
    (then the default of hybrid_tree_attention): renamed to "hybrid_fa_tuned"."""
    with open(path) as f:
        data = json.load(f)
    for row in data["rows"]:
        if "hybrid_auto_ms" in row:
            row["hybrid_fa_tuned_ms"] = row.pop("hybrid_auto_ms")
        for key in RATIO_KEYS:
            row.pop(key, None)
        add_ratios(row)
    data["meta"]["methods"] = {"hybrid": "FA3 prefix, num_splits=0 (FA3's own): the default",
                               "hybrid_fa_tuned": "FA3 prefix, fa_num_splits_heuristic",
                               "hybrid_triton": "Triton split-KV prefix (its heuristic config)"}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print_table(data["rows"])
    png = os.path.join(os.path.dirname(path), "bench_tree_attention.png")
    if plot(data["rows"], png):
        print(f"wrote {path} and {png}")
    return 0


def run_sweep(args, device: str) -> None:
    """Times the fused hybrid over the tree kernel's tile configs at each (batch, tree)."""
    ctx = min(args.contexts)
    print(f"tile sweep at context {ctx} (LONGSPEC_TREE_ATTN_CONFIG picks a config):")
    for b in args.batches:
        cache = make_cache(b, ctx, max(args.trees), device, seed=b)
        for n in args.trees:
            tree = make_tree_inputs(b, n, device, seed=n)
            results = []
            for cfg in K.tree_attn_autotune_configs():
                tc = K.TreeAttnConfig(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"],
                                      cfg.num_warps, cfg.num_stages)
                fn = lambda: K.tree_attention(  # noqa: E731
                    tree["q"], tree["tree_k"], tree["tree_v"], tree["cu_seqlens"],
                    tree["tree_mask"], max_seqlen=n, config=tc)
                try:
                    results.append((time_ms(fn, args.rep_ms, device), tc))
                except Exception as exc:  # noqa: BLE001 - some tiles may not compile/fit
                    print(f"  {tc}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            results.sort(key=lambda x: x[0])
            best = ", ".join(f"{t * 1e3:.1f}us {_tiles_text(c)}" for t, c in results[:3])
            print(f"  batch {b} tree {n}: default {_tiles_text(tree_tiles(b, n))}; best: {best}")
        del cache
        empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--trees", type=int, nargs="+", default=[1, 16, 69, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench time budget per method")
    parser.add_argument("--timing", choices=["eager", "graph"], default="eager",
                        help="graph: time CUDA-graph replays of every method (GPU time only, as "
                             "inside vLLM's full CUDA graphs); eager: time the calls (adds host "
                             "time where the GPU waits for it)")
    parser.add_argument("--hbm-tb-s", type=float, default=None,
                        help="bandwidth of the HBM floor in TB/s (default: 4.8 on an H200, else 3.0)")
    parser.add_argument("--check", action="store_true", help="verify correctness first")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--force", action="store_true", help="benchmark even if --check fails")
    parser.add_argument("--no-sdpa", action="store_true", help="skip the masked-SDPA baseline")
    parser.add_argument("--sdpa-mem-frac", type=float, default=0.6,
                        help="skip SDPA when its estimated bytes exceed this fraction of free")
    parser.add_argument("--autotune", action="store_true", help="triton.autotune the tree kernel")
    parser.add_argument("--sweep", action="store_true", help="time every tree-kernel tile config")
    parser.add_argument("--prefix-sweep", action="store_true",
                        help="also time FA3 num_splits 1..32 and Triton prefix configs per shape")
    parser.add_argument("--force-prefix-split", action="store_true",
                        help="time hybrid_split/fa_prefix_split wherever FA3's 64-row tile "
                             "applies, also where it saves no rows (e.g. 64 nodes)")
    parser.add_argument("--alt-block-sizes", type=int, nargs="+", default=[], metavar="N",
                        help="also time the hybrid and FA3 prefix over the same tokens in pages of "
                             "N (hybrid_pgN, fa_prefix_pgN; a multiple of FA3's key tile, e.g. "
                             "176 at head dim 128, takes its TMA path) and report the largest "
                             "output difference to the default pages (pgN_max_diff)")
    parser.add_argument("--fa-version", type=int, default=None)
    parser.add_argument("--replot", metavar="JSON", default=None,
                        help="only re-derive ratios, table and PNG of a saved result (no GPU)")
    parser.add_argument("--device", default="cuda",
                        help="'cpu' = plumbing dry run at tiny sizes (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.replot)

    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("bench_tree_attention needs a CUDA GPU (or --device cpu for a dry run)")
            return 2
        if not K.flash_attn_available():
            print("vllm.vllm_flash_attn is not importable: source the vLLM environment first")
            return 2
        device_name = torch.cuda.get_device_name()
        fa_desc = f"FA{args.fa_version or K.default_fa_version(0)}"
    else:
        device_name, fa_desc = f"cpu ({platform.processor() or 'host'})", "no FA (torch prefix)"
    print(f"device: {device_name}  torch {torch.__version__}  {fa_desc}  "
          f"tree tiles {'autotuned' if args.autotune else 'per shape (tree_config column)'}")

    if args.check or args.check_only:
        ok = run_check(device, args.fa_version, args.alt_block_sizes)
        print(f"correctness: {'ALL PASS' if ok else 'FAILURES'}")
        if args.check_only:
            return 0 if ok else 1
        if not ok and not args.force:
            print("not benchmarking a failing kernel (use --force)")
            return 1
    if args.sweep:
        run_sweep(args, device)
        return 0

    try:
        from tqdm import tqdm
    except ImportError:
        class tqdm:  # noqa: N801 - minimal stand-in
            def __init__(self, total=0, **_):
                self.n, self.total = 0, total

            def update(self, k=1):
                self.n += k
                print(f"[{self.n}/{self.total}]", flush=True)

            def close(self):
                pass

    hbm_bytes = args.hbm_tb_s * 1e12 if args.hbm_tb_s else hbm_bytes_per_s(device_name)
    os.makedirs(args.out, exist_ok=True)
    rows, skipped = [], []
    meta = dict(
        device=device_name, torch=torch.__version__,
        triton=__import__("triton").__version__, python=platform.python_version(),
        prefix_kernel=fa_desc,
        tree_tiles="per shape: each row's tree_config (default_tree_attn_config)",
        autotune=args.autotune,
        shape=dict(num_q_heads=HQ, num_kv_heads=HK, head_dim=HEAD_DIM, dtype=str(DTYPE),
                   block_size=BLOCK_SIZE, alt_block_sizes=args.alt_block_sizes),
        hbm_bytes_per_s=hbm_bytes, peak_flops=PEAK_FLOPS,
        num_sms=K.num_sms() if device.startswith("cuda") else None,
        fa_splits_rule="fa_num_splits_heuristic (0 = FA3's own)",
        timing=(f"triton.testing.do_bench median, {args.timing}"
                + (" (CUDA-graph replays)" if args.timing == "graph" else " calls")
                if device.startswith("cuda") else "cpu dry run"),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    try:
        import vllm
        meta["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    json_path = os.path.join(args.out, "bench_tree_attention.json")

    def save() -> None:   # after every shape, so a run cut short still leaves its rows
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows, skipped=skipped), f, indent=1)

    configs = [(b, c, n) for b in args.batches for c in args.contexts for n in args.trees]
    bar = tqdm(total=len(configs), desc="configs")
    for b in args.batches:
        for ctx in args.contexts:
            try:
                cache = make_cache(b, ctx, max(args.trees), device, seed=b * 7 + ctx)
                alts = tuple(repage(cache, n, seed=b) for n in args.alt_block_sizes)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                for n in args.trees:
                    skipped.append(f"batch {b} ctx {ctx} tree {n}: cache does not fit")
                    bar.update(1)
                empty_cache()
                continue
            for n in args.trees:
                row = dict(batch=b, context=ctx, tree=n, tree_config=_tiles_text(tree_tiles(b, n)),
                           hbm_floor_ms=hbm_floor_ms(b, ctx, n, hbm_bytes),
                           compute_floor_ms=compute_floor_ms(b, ctx, n))
                tree = make_tree_inputs(b, n, device, seed=n)
                methods = build_methods(cache, tree, n, args, alts=alts)
                helpers = {k: methods.pop(k) for k in list(methods) if k.startswith("_")}
                row.update(helpers.get("_settings", {}))
                if alts:
                    methods["hybrid"]()   # fills the default output the diffs compare with
                for page, base_out, alt_out in helpers["_alt_outputs"]:
                    methods[f"hybrid_pg{page}"]()
                    row[f"pg{page}_max_diff"] = (
                        (base_out.float() - alt_out.float()).abs().max().item())
                free = free_bytes(device)
                if args.no_sdpa:
                    row["sdpa_masked_ms"] = "off"
                elif sdpa_bytes(b, ctx, n) > args.sdpa_mem_frac * free:
                    row["sdpa_masked_ms"] = "skip"
                    skipped.append(f"batch {b} ctx {ctx} tree {n}: sdpa_masked needs ~"
                                   f"{sdpa_bytes(b, ctx, n) / MIB:.0f} MiB, free {free / MIB:.0f}")
                else:
                    try:
                        methods["sdpa_masked"] = build_sdpa(cache, tree, n)
                    except Exception as exc:  # noqa: BLE001 - report and keep going
                        row["sdpa_masked_ms"] = "OOM" if is_oom(exc) else "ERR"
                        skipped.append(f"batch {b} ctx {ctx} tree {n}: sdpa_masked setup "
                                       f"{type(exc).__name__}: {str(exc)[:120]}")
                        empty_cache()
                for name, fn in methods.items():
                    try:
                        row[f"{name}_ms"] = time_ms(fn, args.rep_ms, device, args.timing)
                    except Exception as exc:  # noqa: BLE001 - report and keep going
                        row[f"{name}_ms"] = "OOM" if is_oom(exc) else "ERR"
                        skipped.append(f"batch {b} ctx {ctx} tree {n}: {name} "
                                       f"{type(exc).__name__}: {str(exc)[:120]}")
                    empty_cache()
                methods.pop("sdpa_masked", None)
                if args.prefix_sweep:
                    row.update(prefix_sweep(helpers, n, ctx, args, device))
                    empty_cache()
                add_ratios(row)
                rows.append(row)
                save()
                del methods, tree
                empty_cache()
                bar.update(1)
            del cache, alts
            empty_cache()
    bar.close()

    print_table(rows)
    if skipped:
        print("\nskipped / failed:")
        for s in skipped:
            print(f"  {s}")
    save()
    png_path = os.path.join(args.out, "bench_tree_attention.png")
    wrote_png = plot(rows, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if wrote_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
