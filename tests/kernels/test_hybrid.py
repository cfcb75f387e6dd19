"""Hybrid tree attention (paged prefix + tree + merge) vs float64 references.

The differential test checks every node against plain attention over its committed prefix plus its
root-to-node chain, computed from the dense tensors and the parent arrays only (no mask, no cache).
"""

import pytest
import torch

from vllm_longspec_kernels import (
    build_tree_mask,
    hybrid_tree_attention,
    hybrid_tree_attention_ref,
    paged_prefix_attention_torch,
    split_kv_cache,
)

HQ, HK, D, BS = 8, 2, 64, 16


def make_requests(kit, specs, dtype, layout):
    """specs: list of (prefix_len, num_nodes, tree kind). Builds dense tensors and a paged cache
    with randomly permuted blocks in a vLLM layout ("flash" or "cpu")."""
    parents = [kit.parents(n, kind) for _, n, kind in specs]
    prefix_lens = [p for p, _, _ in specs]
    sizes = [n for _, n, _ in specs]
    total = sum(sizes)
    need = [(p + BS - 1) // BS for p in prefix_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=kit.gen).tolist()
    max_blocks = max(max(need), 1) + 1
    # Unused block-table entries hold valid-but-wrong ids: they must be ignored.
    block_table = torch.tensor([[perm[-1]] * max_blocks for _ in specs], dtype=torch.int32)
    kv = kit.randn(num_blocks, HK, BS, 2 * D, dtype=dtype)
    k_cache, v_cache = split_kv_cache(kv, layout)             # [num_blocks, BS, HK, D] views
    dense_k, dense_v, cursor = [], [], 0
    for b, plen in enumerate(prefix_lens):
        blocks = perm[cursor:cursor + need[b]]
        cursor += need[b]
        block_table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pk, pv = kit.randn(plen, HK, D, dtype=dtype), kit.randn(plen, HK, D, dtype=dtype)
        for t in range(plen):
            k_cache[blocks[t // BS], t % BS] = pk[t]
            v_cache[blocks[t // BS], t % BS] = pv[t]
        dense_k.append(pk)
        dense_v.append(pv)
    args = dict(
        q=kit.randn(total, HQ, D, dtype=dtype),
        prefix_k_cache=k_cache,
        prefix_v_cache=v_cache,
        block_table=block_table.to(kit.device),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=kit.device),
        tree_k=kit.randn(total, HK, D, dtype=dtype),
        tree_v=kit.randn(total, HK, D, dtype=dtype),
        cu_seqlens=kit.cu_seqlens(sizes),
        tree_mask=build_tree_mask(parents, device=kit.device),
        softmax_scale=0.9 * D ** -0.5,
    )
    return args, parents, dense_k, dense_v


MIXED = [
    (0, 12, "random"),     # no prefix
    (37, 1, "chain"),      # plain decode
    (50, 69, "beam"),      # LongSpec-sized tree
    (20, 100, "chain"),    # prefill chunk, longer than the 3-word (96-node) bitmask window
    (5, 9, "star"),
    (16, 0, "chain"),      # request with nothing scheduled
]


def chain_attention(args, parents, dense_k, dense_v):
    """Per node: softmax over prefix + root-to-node path, no masks (float64)."""
    gqa = HQ // HK
    out = torch.zeros(args["q"].shape, dtype=torch.float64)
    cu = args["cu_seqlens"].tolist()
    for b, par in enumerate(parents):
        for i in range(len(par)):
            path, j = [], i
            while j >= 0:
                path.append(cu[b] + j)
                j = par[j]
            keys = torch.cat([dense_k[b], args["tree_k"][path]]).double().cpu()
            vals = torch.cat([dense_v[b], args["tree_v"][path]]).double().cpu()
            q = args["q"][cu[b] + i].double().cpu()                               # [HQ, D]
            keys = keys.repeat_interleave(gqa, 1)                                 # [L, HQ, D]
            vals = vals.repeat_interleave(gqa, 1)
            p = torch.softmax(torch.einsum("hd,lhd->hl", q, keys) * args["softmax_scale"], -1)
            out[cu[b] + i] = torch.einsum("hl,lhd->hd", p, vals)
    return out


@pytest.mark.parametrize("layout", ["flash", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse_merge", [True, False])
def test_mixed_batch_vs_float64_reference(kit, layout, dtype, fuse_merge):
    args, _, _, _ = make_requests(kit, MIXED, dtype, layout)
    assert args["tree_mask"].shape[1] == 3
    total = args["q"].shape[0]
    out = torch.full((total, HQ, D), float("nan"), dtype=dtype, device=kit.device)
    out, lse = hybrid_tree_attention(**args, out=out, return_lse=True, fuse_merge=fuse_merge)
    ref_out, ref_lse = hybrid_tree_attention_ref(**args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - ref_out).abs().max() <= kit.out_atol[dtype]
    assert (lse.double() - ref_lse).abs().max() <= kit.lse_atol[dtype]


@pytest.mark.parametrize("tree_backend", ["triton", "torch"])
def test_differential_every_node_equals_its_chain(kit, tree_backend):
    specs = [(kit.randint(0, 40), kit.randint(1, 30), kind)
             for kind in ("random", "beam", "forest", "star")]
    args, parents, dense_k, dense_v = make_requests(kit, specs, torch.float32, "flash")
    out = hybrid_tree_attention(**args, tree_backend=tree_backend)
    expected = chain_attention(args, parents, dense_k, dense_v)
    assert (out.double().cpu() - expected).abs().max() <= 2e-5


@pytest.mark.parametrize("tree_backend", ["triton", "torch"])
def test_differential_trees_past_one_mask_word(kit, tree_backend):
    # LongSpec's default tree has 69 nodes: three 32-bit mask words per row.
    specs = [(kit.randint(1, 40), 69, "beam"), (kit.randint(1, 40), kit.randint(33, 70), "random")]
    args, parents, dense_k, dense_v = make_requests(kit, specs, torch.float32, "cpu")
    out = hybrid_tree_attention(**args, tree_backend=tree_backend)
    expected = chain_attention(args, parents, dense_k, dense_v)
    assert (out.double().cpu() - expected).abs().max() <= 2e-5


def test_reference_fails_on_wrong_tree(kit):
    # The differential oracle is sensitive: swapping two parents changes the result.
    specs = [(10, 8, "chain")]
    args, parents, dense_k, dense_v = make_requests(kit, specs, torch.float32, "cpu")
    out = hybrid_tree_attention(**args)
    wrong = [[-1, 0, 1, 2, 3, 4, 4, 6]]
    assert (out.double().cpu() - chain_attention(args, wrong, dense_k, dense_v)).abs().max() > 1e-3


def test_all_prefixes_empty(kit):
    args, _, _, _ = make_requests(kit, [(0, 5, "random"), (0, 1, "chain")], torch.float16, "flash")
    out, lse = hybrid_tree_attention(**args, return_lse=True, max_prefix_len=0)
    ref_out, ref_lse = hybrid_tree_attention_ref(**args)
    assert (out.double() - ref_out).abs().max() <= kit.out_atol[torch.float16]
    assert (lse.double() - ref_lse).abs().max() <= kit.lse_atol[torch.float16]


def test_paged_prefix_torch_matches_dense(kit):
    specs = [(33, 3, "random"), (0, 2, "chain"), (16, 1, "chain")]
    args, _, dense_k, dense_v = make_requests(kit, specs, torch.float32, "cpu")
    out, lse = paged_prefix_attention_torch(
        args["q"], args["prefix_k_cache"], args["prefix_v_cache"], args["block_table"],
        args["prefix_lens"], args["cu_seqlens"], args["softmax_scale"],
        compute_dtype=torch.float64)
    cu = args["cu_seqlens"].tolist()
    for b in range(len(specs)):
        s, e = cu[b], cu[b + 1]
        if dense_k[b].shape[0] == 0:
            assert (out[s:e] == 0).all() and (lse[:, s:e] == float("-inf")).all()
            continue
        q = args["q"][s:e].double().transpose(0, 1)
        k = dense_k[b].double().transpose(0, 1).repeat_interleave(HQ // HK, 0)
        v = dense_v[b].double().transpose(0, 1).repeat_interleave(HQ // HK, 0)
        scores = q @ k.transpose(1, 2) * args["softmax_scale"]
        torch.testing.assert_close(out[s:e], (torch.softmax(scores, -1) @ v).transpose(0, 1))
        torch.testing.assert_close(lse[:, s:e], torch.logsumexp(scores, -1))
