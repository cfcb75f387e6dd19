"""Triton tree attention vs the float64 torch reference (and vs dense masked attention)."""

import math

import pytest
import torch

from vllm_longspec_kernels import (
    TreeAttnConfig,
    build_tree_mask,
    hopper_tree_attn_config,
    merge_attn_states_ref,
    tree_attention,
    tree_attention_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_batch(kit, sizes, kinds, hq, hk, d, dtype, num_words=None):
    parents = [kit.parents(n, kind) for n, kind in zip(sizes, kinds)]
    total = sum(sizes)
    return dict(
        q=kit.randn(total, hq, d, dtype=dtype),
        k=kit.randn(total, hk, d, dtype=dtype),
        v=kit.randn(total, hk, d, dtype=dtype),
        cu_seqlens=kit.cu_seqlens(sizes),
        tree_mask=build_tree_mask(parents, num_words=num_words, device=kit.device),
    ), parents


def assert_close(kit, dtype, out, lse, ref_out, ref_lse):
    assert torch.isfinite(out).all(), "non-finite output"
    assert torch.isfinite(lse).all(), "non-finite lse"
    err = (out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert err <= kit.out_atol[dtype], f"out err {err}"
    assert lse_err <= kit.lse_atol[dtype], f"lse err {lse_err}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 32), (8, 2, 64), (6, 1, 80)])
def test_mixed_batch_poisoned_outputs(kit, dtype, hq, hk, d):
    # Decode (1 node), a LongSpec-like 69-node beam tree, a random tree, a star and a forest.
    sizes = [1, 69, kit.randint(2, 40), kit.randint(2, 20), kit.randint(2, 33)]
    kinds = ["chain", "beam", "random", "star", "forest"]
    batch, _ = make_batch(kit, sizes, kinds, hq, hk, d, dtype)
    total = sum(sizes)
    out = torch.full((total, hq, d), float("nan"), dtype=dtype, device=kit.device)
    lse = torch.full((hq, total), float("nan"), dtype=torch.float32, device=kit.device)
    scale = 0.7 / math.sqrt(d)
    res_out, res_lse = tree_attention(**batch, softmax_scale=scale, out=out, lse=lse)
    assert res_out is out and res_lse is lse
    ref_out, ref_lse = tree_attention_ref(**batch, softmax_scale=scale)
    assert_close(kit, dtype, out, lse, ref_out, ref_lse)


def test_reference_matches_dense_sdpa(kit):
    # Guard the reference itself with an independent formulation (SDPA with a boolean mask).
    batch, parents = make_batch(kit, [13], ["random"], 4, 2, 32, torch.float64)
    ref_out, _ = tree_attention_ref(**batch)
    vis = torch.zeros(13, 13, dtype=torch.bool)
    for i in range(13):
        j = i
        while j >= 0:
            vis[i, j] = True
            j = parents[0][j]
    q = batch["q"].transpose(0, 1)
    k = batch["k"].transpose(0, 1).repeat_interleave(2, 0)
    v = batch["v"].transpose(0, 1).repeat_interleave(2, 0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=vis.to(q.device))
    torch.testing.assert_close(ref_out, sdpa.transpose(0, 1))


@pytest.mark.parametrize("cfg", [TreeAttnConfig(16, 16, 4, 1), TreeAttnConfig(16, 64, 4, 2),
                                 TreeAttnConfig(64, 32, 4, 1)])
def test_tile_sizes_and_multi_block_loops(kit, cfg):
    # Trees larger than both tiles exercise several M tiles and several key blocks per tile.
    sizes = [kit.randint(40, 90), 1, kit.randint(17, 33)]
    batch, _ = make_batch(kit, sizes, ["random", "chain", "beam"], 8, 2, 32, torch.float32)
    out, lse = tree_attention(**batch, config=cfg)
    ref_out, ref_lse = tree_attention_ref(**batch)
    assert_close(kit, torch.float32, out, lse, ref_out, ref_lse)


def test_prefill_chain_past_window_and_empty_request(kit):
    # A 70-token prefill chunk (causal beyond the 1-word window), an empty request, a tree.
    sizes = [70, 0, 25]
    batch, _ = make_batch(kit, sizes, ["chain", "chain", "random"], 4, 2, 32, torch.bfloat16)
    assert batch["tree_mask"].shape[1] == 1
    out, lse = tree_attention(**batch)
    ref_out, ref_lse = tree_attention_ref(**batch)
    assert_close(kit, torch.bfloat16, out, lse, ref_out, ref_lse)
    # The chain must equal plain causal attention.
    q, k, v = (batch[x][:70].double().transpose(0, 1) for x in "qkv")
    k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out[:70].double() - causal.transpose(0, 1)).abs().max() <= 3e-2


def test_all_causal_zero_words(kit):
    batch, _ = make_batch(kit, [5, 40], ["chain", "chain"], 2, 2, 32, torch.float32)
    assert batch["tree_mask"].shape[1] == 0
    out, lse = tree_attention(**batch)
    assert_close(kit, torch.float32, out, lse, *tree_attention_ref(**batch))


def test_padding_rows_untouched(kit):
    # Tokens past cu_seqlens[-1] (e.g. CUDA-graph padding) are neither read nor written.
    batch, _ = make_batch(kit, [9, 4], ["random", "star"], 4, 1, 32, torch.float16)
    pad = 3
    for name in "qkv":
        x = batch[name]
        batch[name] = torch.cat([x, torch.full_like(x[:pad], float("nan"))])
    batch["tree_mask"] = torch.cat([batch["tree_mask"], batch["tree_mask"][:pad]])
    out = torch.full_like(batch["q"], 7.0)
    lse = torch.full((4, 16), 7.0, device=kit.device)
    tree_attention(**batch, out=out, lse=lse, max_seqlen=9)
    assert (out[13:] == 7.0).all() and (lse[:, 13:] == 7.0).all()
    assert torch.isfinite(out[:13]).all() and torch.isfinite(lse[:, :13]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefix_merge(kit, dtype):
    sizes = [1, kit.randint(10, 50), kit.randint(2, 20), 6]
    hq, hk, d = 8, 2, 64
    batch, _ = make_batch(kit, sizes, ["chain", "beam", "random", "star"], hq, hk, d, dtype)
    total = sum(sizes)
    # Within the magnitude OUT_ATOL assumes (<= ~3): a bf16 N(0, 1) draw past 4 has an ulp of
    # 1/32, which alone exceeds the bf16 tolerance once the fp32 merge rounds the other way.
    prefix_out = kit.randn(total, hq, d).clamp(-3, 3).to(dtype)
    prefix_lse = kit.randn(hq, total) * 3
    prefix_lens = torch.tensor([5, 9, 0, 3], dtype=torch.int32, device=kit.device)
    cu = batch["cu_seqlens"].tolist()
    # Request 2 has no prefix: its partial output is garbage (NaN) as FlashAttention may leave it.
    prefix_out[cu[2]:cu[3]] = float("nan")
    prefix_lse[:, cu[2]:cu[3]] = float("-inf")
    # Request 3 reports FlashAttention-2's +inf LSE for some heads of an empty row: no prefix there.
    prefix_lse[:2, cu[3]:cu[4]] = float("inf")
    prefix_out[cu[3]:cu[4], :2] = float("nan")
    out = torch.full((total, hq, d), float("nan"), dtype=dtype, device=kit.device)
    out, lse = tree_attention(**batch, out=out, prefix_out=prefix_out, prefix_lse=prefix_lse,
                              prefix_lens=prefix_lens)
    tree_out, tree_lse = tree_attention_ref(**batch)
    ref_out, ref_lse = merge_attn_states_ref(prefix_out, prefix_lse, tree_out, tree_lse)
    assert_close(kit, dtype, out, lse, ref_out, ref_lse)


def test_fp32_output_buffer_for_bf16_inputs(kit):
    batch, _ = make_batch(kit, [30, 3], ["beam", "random"], 4, 2, 32, torch.bfloat16)
    out = torch.full((33, 4, 32), float("nan"), dtype=torch.float32, device=kit.device)
    tree_attention(**batch, out=out)
    ref_out, _ = tree_attention_ref(**batch)
    # No final bf16 rounding: only the P·V operand rounding remains.
    assert (out.double() - ref_out).abs().max() <= 1.5e-2


def test_wrong_mask_is_detected(kit):
    # The comparison can fail: dropping one ancestor bit changes that row's output.
    batch, _ = make_batch(kit, [12], ["chain"], 2, 2, 32, torch.float32, num_words=1)
    ref_out, _ = tree_attention_ref(**batch)
    bad = batch["tree_mask"].clone()
    bad[11, 0] &= ~(1 << 5)
    out, _ = tree_attention(**{**batch, "tree_mask": bad})
    row_err = (out.double() - ref_out).abs().amax(dim=(1, 2))
    assert row_err[11] > 1e-3 and row_err[:11].max() < 1e-4


@pytest.mark.parametrize("bad", ["heads", "mask_dtype", "cu_dtype"])
def test_input_validation(kit, bad):
    batch, _ = make_batch(kit, [4], ["random"], 4, 2, 32, torch.float32)
    if bad == "heads":
        batch["k"] = kit.randn(4, 3, 32)
        batch["v"] = kit.randn(4, 3, 32)
    elif bad == "mask_dtype":
        batch["tree_mask"] = batch["tree_mask"].long()
    else:
        batch["cu_seqlens"] = batch["cu_seqlens"].long()
    with pytest.raises(ValueError):
        tree_attention(**batch)


def test_torch_fallback_matches_kernel(kit):
    # The CPU fallback (used when the kernels are not interpreted) honours the same contract.
    fallback = tree_attention.__globals__["_tree_attention_torch"]

    sizes = [9, 1, 30]
    batch, _ = make_batch(kit, sizes, ["random", "chain", "beam"], 4, 2, 32, torch.float32)
    total = sum(sizes)
    prefix_out = kit.randn(total, 4, 32)
    prefix_lse = kit.randn(4, total)
    prefix_lens = torch.tensor([3, 0, 7], dtype=torch.int32, device=kit.device)
    prefix_out[9:10] = float("nan")   # request 1 has no prefix
    kwargs = dict(prefix_out=prefix_out, prefix_lse=prefix_lse, prefix_lens=prefix_lens)
    out, lse = tree_attention(**batch, **kwargs)
    fb_out = torch.full_like(out, float("nan"))
    fb_lse = torch.full_like(lse, float("nan"))
    fallback(*batch.values(), 32 ** -0.5, fb_out, fb_lse, **kwargs)
    assert torch.isfinite(fb_out).all() and torch.isfinite(fb_lse).all()
    assert (fb_out - out).abs().max() <= 1e-5 and (fb_lse - lse).abs().max() <= 1e-5


def test_hopper_tile_choice_follows_the_grid_size():
    # The H200 measurement behind the rule: 16-row tiles while the grid fits in ~2 programs per
    # SM, 64x32 tiles beyond; fp32 and head dims > 128 keep the wide tiles.
    bf16 = torch.bfloat16
    assert hopper_tree_attn_config(128, bf16, 69 * 4, 8, sms=132) == TreeAttnConfig(16, 64, 4, 2)
    assert hopper_tree_attn_config(128, bf16, 16 * 4, 64, sms=132) == TreeAttnConfig(16, 64, 4, 2)
    assert hopper_tree_attn_config(128, bf16, 69 * 4, 64, sms=132) == TreeAttnConfig(64, 32, 4, 1)
    assert hopper_tree_attn_config(128, bf16, 69 * 4, 8, sms=16) == TreeAttnConfig(64, 32, 4, 1)
    assert hopper_tree_attn_config(128, bf16, None, None) == TreeAttnConfig(64, 64, 4, 2)
    assert hopper_tree_attn_config(256, bf16, 4, 8, sms=132).block_n == 32
    assert hopper_tree_attn_config(128, torch.float32, 4, 8, sms=132).block_m == 64
