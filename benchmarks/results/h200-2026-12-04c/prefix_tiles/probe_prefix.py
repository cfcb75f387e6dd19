"""Probe: Triton prefix tiles (with tail rows) vs FA3 over a paged prefix, CUDA-graph replays."""
import math, sys, time
import torch, triton, triton.testing
from vllm_longspec_kernels import PrefixAttnConfig, paged_prefix_attention, split_kv_cache
from vllm.vllm_flash_attn import flash_attn_varlen_func

HQ, HK, D, BS = 32, 8, 128, 16
BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 400
T0 = time.time()
SMS = torch.cuda.get_device_properties(0).multi_processor_count


def graph(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    torch.cuda.synchronize(); return g.replay


def bench(fn):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(graph(fn), warmup=10, rep=40, return_mode="median")


TILES = [  # m, t, n, warps, stages
    (64, 0, 64, 4, 3), (128, 0, 128, 8, 2),
    (64, 16, 64, 4, 3),
    (128, 16, 64, 8, 3), (128, 16, 128, 8, 2), (128, 16, 64, 8, 4), (128, 32, 64, 8, 3),
    (256, 32, 64, 8, 2), (256, 32, 64, 16, 3), (256, 32, 128, 16, 2), (256, 32, 32, 8, 3),
]
SHAPES = [(1, 131072, 69), (1, 32768, 69), (8, 32768, 69), (1, 131072, 64)]
for batch, ctx, nodes in SHAPES:
    g = torch.Generator(device="cuda").manual_seed(0)
    nb = batch * math.ceil(ctx / BS)
    phys = torch.randn(nb, BS, HK, 2 * D, generator=g, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = split_kv_cache(phys.permute(0, 2, 1, 3), "flash")
    bt = torch.randperm(nb, generator=g, device="cuda").to(torch.int32).view(batch, -1).contiguous()
    total = batch * nodes
    q = torch.randn(total, HQ, D, generator=g, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, total + 1, nodes, dtype=torch.int32, device="cuda")
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    scale = D ** -0.5
    fa = lambda: flash_attn_varlen_func(q=q, k=k_cache, v=v_cache, max_seqlen_q=nodes, cu_seqlens_q=cu,
                                        max_seqlen_k=ctx, seqused_k=lens, block_table=bt,
                                        softmax_scale=scale, causal=False, return_softmax_lse=True,
                                        fa_version=3)
    ref, ref_lse = fa()
    t_fa = bench(fa)
    real_flop = 4 * batch * HQ * nodes * ctx * D
    print(f"== batch {batch} ctx {ctx} nodes {nodes}: FA3 {t_fa*1e3:.1f} us "
          f"({real_flop / t_fa / 1e9:.0f} TFLOP/s real rows)", flush=True)
    rows = nodes * HQ // HK
    out = torch.empty_like(q); lse = torch.empty(HQ, total, device="cuda")
    for m, t, n, w, st in TILES:
        base = batch * HK * -(-rows // (m + t))
        max_splits = max(1, ctx // (4 * n))
        for waves in (1, 2):
            splits = max(1, min(64, max_splits, round(waves * SMS / base)))
            cfg = PrefixAttnConfig(m, n, w, st, splits, t)
            if time.time() - T0 > BUDGET:
                print("budget spent", flush=True); break
            fn = lambda: paged_prefix_attention(q, k_cache, v_cache, bt, lens, cu, scale,
                                                max_seqlen_q=nodes, max_prefix_len=ctx, out=out,
                                                lse=lse, config=cfg)
            try:
                c0 = time.time(); fn(); torch.cuda.synchronize(); comp = time.time() - c0
                err = (out.float() - ref.float()).abs().max().item()
                lerr = (lse - ref_lse).abs().max().item()
                tt = bench(fn)
                print(f"{cfg.short():28s} {tt*1e3:8.1f} us  x{tt/t_fa:5.2f} FA3  "
                      f"{real_flop / tt / 1e9:4.0f} TF/s  err {err:.1e} lse {lerr:.1e}  "
                      f"first call {comp:.1f}s", flush=True)
            except Exception as exc:
                print(f"{cfg.short():28s} ERR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    del phys, k_cache, v_cache; torch.cuda.empty_cache()
print(f"done in {time.time()-T0:.0f}s")
