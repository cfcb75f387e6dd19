"""Split-KV paged prefix attention (Triton) vs the float64 torch reference.

Paged caches with permuted blocks in both vLLM layouts, GQA, prefixes that end inside / at the end
of a page, empty prefixes, requests without queries, more splits than key tiles, and padding rows
past the last request (never written).
"""

import pytest
import torch

from vllm_longspec_kernels import (
    PrefixAttnConfig,
    default_prefix_attn_config,
    fa_num_splits_heuristic,
    hybrid_tree_attention,
    hybrid_tree_attention_ref,
    paged_prefix_attention,
    paged_prefix_attention_torch,
    prefix_attn_sweep_configs,
    split_kv_cache,
)

BS = 16


def make_paged(kit, prefix_lens, sizes, hq, hk, d, dtype, layout, pad_rows=0):
    need = [(p + BS - 1) // BS for p in prefix_lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=kit.gen).tolist()
    # Unused entries hold valid-but-wrong block ids: they must never be read.
    table = torch.full((len(prefix_lens), max(max(need), 1) + 1), perm[-1], dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[cursor:cursor + n], dtype=torch.int32)
        cursor += n
    kv = kit.randn(num_blocks, hk, BS, 2 * d, dtype=dtype)
    k_cache, v_cache = split_kv_cache(kv, layout)
    total = sum(sizes) + pad_rows
    return dict(q=kit.randn(total, hq, d, dtype=dtype), k_cache=k_cache, v_cache=v_cache,
                block_table=table.to(kit.device),
                prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=kit.device),
                cu_seqlens=kit.cu_seqlens(sizes), softmax_scale=1.1 * d ** -0.5)


def reference(args):
    return paged_prefix_attention_torch(**args, compute_dtype=torch.float64)


def check(kit, args, out, lse, dtype, rows=None):
    ref_out, ref_lse = reference(args)
    rows = slice(None) if rows is None else slice(0, rows)
    assert torch.isfinite(out[rows]).all()
    assert (out[rows].double() - ref_out[rows]).abs().max() <= kit.out_atol[dtype]
    finite = torch.isfinite(ref_lse[:, rows])
    assert torch.equal(torch.isfinite(lse[:, rows]), finite)
    assert (lse[:, rows].double()[finite] - ref_lse[:, rows][finite]).abs().max() <= \
        kit.lse_atol[dtype]
    assert (lse[:, rows][~finite] == float("-inf")).all()


@pytest.mark.parametrize("layout", ["flash", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(kit, layout, dtype, splits):
    prefix_lens = [0, 1, 16, 47, 130, 64]
    sizes = [3, 1, 2, 5, 9, 0]
    args = make_paged(kit, prefix_lens, sizes, 8, 2, 64, dtype, layout)
    cfg = PrefixAttnConfig(block_m=16, block_n=32, num_warps=4, num_stages=1, num_splits=splits)
    out = torch.full_like(args["q"], float("nan"))
    out, lse = paged_prefix_attention(**args, out=out, config=cfg)
    check(kit, args, out, lse, dtype)
    assert (out[:3] == 0).all()            # request 0 has no prefix


@pytest.mark.parametrize("hq,hk,d", [(4, 4, 32), (8, 1, 80), (6, 2, 128)])
def test_heads_and_dims(kit, hq, hk, d):
    args = make_paged(kit, [kit.randint(1, 120), kit.randint(1, 120)], [kit.randint(1, 7), 4],
                      hq, hk, d, torch.float16, "flash")
    cfg = PrefixAttnConfig(block_m=32, block_n=16, num_warps=4, num_stages=1,
                           num_splits=kit.randint(1, 4))
    out, lse = paged_prefix_attention(**args, config=cfg)
    check(kit, args, out, lse, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m,block_t", [(16, 16), (32, 16)])
def test_tail_rows(kit, dtype, block_m, block_t):
    # A program covers block_m + block_t packed rows, both tiles fed by the same key tiles:
    # requests whose rows end inside the main tile, inside the tail, or span several programs.
    gqa = 4
    sizes = [kit.randint(1, 3), block_m // gqa + 1, kit.randint(9, 17), 1]
    args = make_paged(kit, [kit.randint(1, 90) for _ in sizes], sizes, 2 * gqa, 2, 64, dtype,
                      "flash", pad_rows=2)
    out = torch.full_like(args["q"], float("nan"))
    cfg = PrefixAttnConfig(block_m=block_m, block_n=16, num_warps=4, num_stages=1,
                           num_splits=kit.randint(1, 3), block_t=block_t)
    assert cfg.rows_per_program == block_m + block_t and f"t{block_t}" in cfg.short()
    out, lse = paged_prefix_attention(**args, out=out, config=cfg)
    check(kit, args, out, lse, dtype, rows=sum(sizes))
    assert torch.isnan(out[sum(sizes):]).all()


def test_more_splits_than_key_tiles_and_padding_rows(kit):
    # 5 splits over 2 tiles of 16 keys: three splits are empty; 3 padding rows stay untouched.
    args = make_paged(kit, [20, 3], [2, 4], 8, 2, 64, torch.float32, "cpu", pad_rows=3)
    out = torch.full_like(args["q"], float("nan"))
    lse = torch.full((8, args["q"].shape[0]), float("nan"), device=kit.device)
    cfg = PrefixAttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, num_splits=5)
    assert PrefixAttnConfig.parse("16,16,4,1,5") == cfg
    assert PrefixAttnConfig.parse("16,16,4,1,5,32").block_t == 32
    paged_prefix_attention(**args, out=out, lse=lse, config=cfg)
    check(kit, args, out, lse, torch.float32, rows=6)
    assert torch.isnan(out[6:]).all() and torch.isnan(lse[:, 6:]).all()


def test_default_config_under_interpreter(kit):
    args = make_paged(kit, [200, 77], [16, 1], 8, 2, 64, torch.float32, "flash")
    out, lse = paged_prefix_attention(**args)
    check(kit, args, out, lse, torch.float32)


@pytest.mark.parametrize("fuse_merge", [True, False])
def test_hybrid_with_triton_prefix(kit, fuse_merge):
    from vllm_longspec_kernels import build_tree_mask

    sizes, prefix_lens = [5, 1, 12], [40, 0, 33]
    args = make_paged(kit, prefix_lens, sizes, 8, 2, 64, torch.float32, "flash")
    parents = [kit.parents(n, "beam") for n in sizes]
    total = sum(sizes)
    hyb = dict(q=args["q"], prefix_k_cache=args["k_cache"], prefix_v_cache=args["v_cache"],
               block_table=args["block_table"], prefix_lens=args["prefix_lens"],
               tree_k=kit.randn(total, 2, 64), tree_v=kit.randn(total, 2, 64),
               cu_seqlens=args["cu_seqlens"], tree_mask=build_tree_mask(parents, device=kit.device),
               softmax_scale=args["softmax_scale"])
    out, lse = hybrid_tree_attention(**hyb, return_lse=True, prefix_backend="triton",
                                     fuse_merge=fuse_merge,
                                     prefix_config=PrefixAttnConfig(16, 16, 4, 1, 2))
    ref_out, ref_lse = hybrid_tree_attention_ref(**hyb)
    assert (out.double() - ref_out).abs().max() <= kit.out_atol[torch.float32]
    assert (lse.double() - ref_lse).abs().max() <= kit.lse_atol[torch.float32]


def test_heuristics_on_h100_shapes(monkeypatch):
    # The module the imported function lives in (the conftest swaps package copies around).
    module = default_prefix_attn_config.__globals__
    monkeypatch.setitem(module, "_interpreting", lambda: False)   # the GPU branch
    for batch, nodes, ctx in [(1, 1, 8192), (1, 69, 131072), (8, 69, 131072), (8, 128, 32768),
                              (1, 16, 512)]:
        cfg = default_prefix_attn_config(batch, nodes, ctx, 32, 8, 128, torch.bfloat16, sms=132)
        rows = nodes * 4
        assert cfg.block_m in (16, 32, 64, 128) and (cfg.block_m >= rows or cfg.block_m >= 64)
        assert (cfg.block_m == 128) == (rows > 128)
        # a tail tile only where it saves a program per KV head (276 rows: 2 x 144, not 3 x 128)
        assert cfg.block_t == (16 if rows == 276 else 0)
        assert 1 <= cfg.num_splits <= module["MAX_SPLITS"]
        assert cfg.num_splits <= max(1, ctx // (4 * cfg.block_n))
        sweep = prefix_attn_sweep_configs(cfg)
        assert cfg in sweep or any(c.num_splits == cfg.num_splits for c in sweep)
    # Batch 1: many idle SMs, many splits; batch 8 x 69 nodes already fills the GPU.
    assert default_prefix_attn_config(1, 69, 131072, 32, 8, 128, sms=132).num_splits >= 4
    assert default_prefix_attn_config(8, 69, 131072, 32, 8, 128, sms=132).num_splits <= 2
    # FA3: keep its own choice when the batch leaves SMs idle; even out two ragged waves.
    assert fa_num_splits_heuristic(1, 69, 131072, 32, 8, sms=132) == 0
    assert fa_num_splits_heuristic(8, 69, 131072, 32, 8, sms=132) == 2
    monkeypatch.setenv("LONGSPEC_PREFIX_ATTN_CONFIG", "32,64,8,2,7")
    assert default_prefix_attn_config(1, 1, 10, 32, 8, 128) == PrefixAttnConfig(32, 64, 8, 2, 7)
