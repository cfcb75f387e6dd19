import sys, time, torch, triton
sys.argv = [sys.argv[0]]
from vllm_longspec_kernels import build_kv_cache_table, compact_kv_caches_ref
from vllm_longspec_kernels.kv_compaction import _compact_kv_kernel
from vllm_longspec_benchmarks.bench_kv_compaction import make_path_pairs, make_pairs, time_ms
L, NB, BS, H, D = 32, 8192, 16, 8, 128
caches = [torch.randn(NB, BS, H, 2 * D, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3) for _ in range(L)]
table = build_kv_cache_table(caches, "flash")
t = table.table.clone(); t[:, 2:] //= 4        # int64 units: strides / 4
g = torch.Generator().manual_seed(0)
cases = {"8 paths": make_path_pairs(8, NB * BS, g, "cuda"), "1 path": make_path_pairs(1, NB * BS, g, "cuda"),
         "64 paths": make_path_pairs(64, NB * BS, g, "cuda"), "40 random": make_pairs(40, 40, NB * BS, g, "cuda")}
for name, (src, dst) in cases.items():
    n = src.shape[0]
    few = [c.clone() for c in caches[:2]]; exp = [c.clone() for c in few]
    compact_kv_caches_ref(exp, src, dst, layout="flash")
    for wide in (False, True):
        hs, eb, tab = (D // 4, 8, t) if wide else (D, 2, table.table)
        for bt in sorted({max(16, triton.next_power_of_2(n)), 16 if n <= 16 else 0} - {0}):
            for bd in (4, 8, 16, 32, 64, 128):
                if bd > hs: continue
                for w in (1, 4):
                    grid = (L, 2 * H, triton.cdiv(hs, bd))
                    def call(tab=tab, bd=bd, w=w, hs=hs, eb=eb, bt=bt):
                        _compact_kv_kernel[grid](tab, src, dst, n, BS, NUM_KV_HEADS=H, HEAD_SIZE=hs,
                                                 ELEM_BYTES=eb, BLOCK_T=bt, BLOCK_D=bd, num_warps=w)
                    try:
                        us = time_ms(call, 20, graph_reps=20) * 1e3
                    except Exception as e:
                        print(name, wide, bt, bd, w, "ERR", str(e)[:100], flush=True); continue
                    print(f"{name:10s} wide={int(wide)} T{bt:4d} D{bd:4d} w{w}  {us:8.1f} us", flush=True)
    # correctness of the wide variant on 2 layers
    tf = build_kv_cache_table(few, "flash").table.clone(); tf[:, 2:] //= 4
    _compact_kv_kernel[(2, 2 * H, 1)](tf, src, dst, n, BS, NUM_KV_HEADS=H, HEAD_SIZE=D // 4, ELEM_BYTES=8,
                                      BLOCK_T=max(16, triton.next_power_of_2(n)), BLOCK_D=32, num_warps=4)
    print(name, "wide correct:", all(torch.equal(a, b) for a, b in zip(few, exp)), flush=True)
