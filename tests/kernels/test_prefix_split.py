"""Tree queries cut into sub-sequences for the prefix attention (FA3's 64-row tile)."""

import pytest
import torch

from vllm_longspec_kernels import (
    fa_one_warpgroup_chunk,
    hybrid_tree_attention,
    hybrid_tree_attention_ref,
    split_prefix_queries,
)

from .test_hybrid import HQ, MIXED, make_requests


@pytest.mark.parametrize("hq,hk,nodes,expected", [
    (32, 8, 69, 16),      # 276 rows: 3 tiles of 128 (384) -> 5 of 64 (320)
    (32, 8, 64, 0),       # 256 rows: 2 tiles of 128, a split is no smaller
    (32, 8, 16, 0),       # 64 rows already take the 64-row tile
    (32, 8, 128, 0),      # 512 = 512
    (12, 2, 69, 10),      # 6 heads per KV head: 414 rows -> 512 vs 7 x 64 = 448
    (32, 32, 69, 0),      # no GQA: 69 rows -> 128 vs 2 x 64 = 128
    (32, 32, 65, 0),
    (32, 8, 33, 16),      # 132 rows: 256 vs 3 x 64 = 192
])
def test_one_warpgroup_chunk_counts_rows(hq, hk, nodes, expected):
    assert fa_one_warpgroup_chunk(hq, hk, nodes) == expected


def test_one_warpgroup_chunk_head_dim_64_has_192_row_tiles():
    # 69 nodes x 2 heads = 138 rows: one 192-row tile = 3 x 64, nothing saved.
    assert fa_one_warpgroup_chunk(4, 2, 69, head_dim=64) == 0
    assert fa_one_warpgroup_chunk(4, 2, 69, head_dim=64, require_saving=False) == 32
    # 100 x 2 = 200 rows: 2 x 192 = 384 vs 4 x 64 = 256.
    assert fa_one_warpgroup_chunk(4, 2, 100, head_dim=64) == 32


def test_one_warpgroup_chunk_rejects_other_head_dims_and_bad_heads():
    assert fa_one_warpgroup_chunk(32, 8, 69, head_dim=256) == 0
    assert fa_one_warpgroup_chunk(32, 8, 69, head_dim=96) == 0
    assert fa_one_warpgroup_chunk(32, 8, 16, require_saving=False) == 0   # already 64 rows
    assert fa_one_warpgroup_chunk(30, 8, 69) == 0
    assert fa_one_warpgroup_chunk(128, 1, 69) == 0        # 128 query heads per KV head


def test_split_metadata_cuts_each_request():
    cu = torch.tensor([0, 69, 70, 70, 90], dtype=torch.int32)
    lens = torch.tensor([100, 7, 0, 33], dtype=torch.int32)
    table = torch.arange(4 * 3, dtype=torch.int32).reshape(4, 3)
    split = split_prefix_queries(cu, lens, table, chunk=16, max_seqlen_q=69)
    assert split.max_seqlen_q == 16
    per = 5
    assert split.cu_seqlens.tolist() == [0, 16, 32, 48, 64,     # 69 queries
                                         69, 70, 70, 70, 70,     # 1
                                         70, 70, 70, 70, 70,     # 0
                                         70, 86, 90, 90, 90,     # 20
                                         90]
    assert split.cu_seqlens.dtype == torch.int32
    assert split.prefix_lens.tolist() == [100] * per + [7] * per + [0] * per + [33] * per
    assert torch.equal(split.block_table, table.repeat_interleave(per, 0))
    assert split.block_table.is_contiguous()
    lengths = split.cu_seqlens.diff()
    assert int(lengths.max()) <= 16 and int(lengths.min()) >= 0


def test_split_of_one_request_is_contiguous():
    # FA3 rejects stride-0 views ("seqused_k must be contiguous"), which one request would give.
    cu = torch.tensor([0, 69], dtype=torch.int32)
    split = split_prefix_queries(cu, torch.tensor([500], dtype=torch.int32),
                                 torch.arange(40, dtype=torch.int32)[None], chunk=16,
                                 max_seqlen_q=69)
    assert split.prefix_lens.is_contiguous() and split.prefix_lens.stride() == (1,)
    assert split.block_table.is_contiguous() and split.block_table.stride() == (40, 1)
    assert split.cu_seqlens.is_contiguous()


def test_split_rejects_empty_chunk():
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk"):
        split_prefix_queries(cu, cu[1:], torch.zeros(1, 1, dtype=torch.int32), chunk=0,
                             max_seqlen_q=3)


@pytest.mark.parametrize("prefix_backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_hybrid_with_split_prefix_equals_reference(kit, prefix_backend, chunk):
    args, _, _, _ = make_requests(kit, MIXED, torch.float32, "flash")
    max_nodes = int(args["cu_seqlens"].diff().max())
    split = split_prefix_queries(args["cu_seqlens"], args["prefix_lens"], args["block_table"],
                                 chunk=chunk, max_seqlen_q=max_nodes)
    total = args["q"].shape[0]
    out = torch.full((total, HQ, args["q"].shape[2]), float("nan"), device=kit.device)
    out, lse = hybrid_tree_attention(**args, out=out, return_lse=True, prefix_split=split,
                                     prefix_backend=prefix_backend, max_seqlen_q=max_nodes)
    ref_out, ref_lse = hybrid_tree_attention_ref(**args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - ref_out).abs().max() <= kit.out_atol[torch.float32]
    assert (lse.double() - ref_lse).abs().max() <= kit.lse_atol[torch.float32]


def test_split_prefix_sees_the_right_pages(kit):
    # A split whose block table rows are shifted by one request must give a different result.
    args, _, _, _ = make_requests(kit, [(40, 20, "beam"), (40, 20, "beam")], torch.float32, "cpu")
    split = split_prefix_queries(args["cu_seqlens"], args["prefix_lens"], args["block_table"],
                                 chunk=8, max_seqlen_q=20)
    split.block_table = split.block_table.roll(1, 0)
    out = hybrid_tree_attention(**args, prefix_split=split, prefix_backend="torch")
    ref_out, _ = hybrid_tree_attention_ref(**args)
    assert (out.double() - ref_out).abs().max() > 1e-3
