"""bench_tree_attention's repaging: the same tokens in pages of another size (FA3's TMA path)."""

import pytest
import torch

from vllm_longspec_kernels import hybrid_tree_attention

from .conftest import DEVICE


def _tokens(cache):
    """[batch, context + room, Hk, D] keys and values, read through the page table."""
    pos = torch.arange(cache.context + cache.room, device=cache.kv.device)
    ks, vs = [], []
    for r in range(cache.batch):
        blocks = cache.block_table[r].long()[pos // cache.block_size]
        ks.append(cache.k_cache[blocks, pos % cache.block_size])
        vs.append(cache.v_cache[blocks, pos % cache.block_size])
    return torch.stack(ks), torch.stack(vs)


@pytest.mark.parametrize("block_size", [48, 176])
def test_repage_keeps_every_token_and_the_attention(block_size):
    bench = pytest.importorskip("vllm_longspec_benchmarks.bench_tree_attention")
    cache = bench.make_cache(2, 200, 9, DEVICE, seed=3)
    alt = bench.repage(cache, block_size, seed=1)
    assert alt.block_size == block_size and alt.k_cache.shape[1] == block_size
    assert alt.block_table.shape == (2, -(-209 // block_size))
    for a, b in zip(_tokens(cache), _tokens(alt)):
        assert torch.equal(a, b)

    nodes = 5
    tree = bench.make_tree_inputs(2, nodes, DEVICE, seed=nodes)
    common = dict(q=tree["q"], tree_k=tree["tree_k"], tree_v=tree["tree_v"],
                  cu_seqlens=tree["cu_seqlens"], tree_mask=tree["tree_mask"],
                  prefix_lens=torch.full((2,), 200, dtype=torch.int32, device=DEVICE),
                  softmax_scale=bench.HEAD_DIM ** -0.5, max_seqlen_q=nodes, max_prefix_len=200,
                  prefix_backend="triton")
    outs = [hybrid_tree_attention(**common, prefix_k_cache=c.k_cache, prefix_v_cache=c.v_cache,
                                  block_table=c.block_table) for c in (cache, alt)]
    assert torch.isfinite(outs[0].float()).all()
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)
