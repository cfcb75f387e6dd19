"""KV compaction across layers, for vLLM's physical cache layouts, against per-slot expectations.

The expected result is written out slot by slot from each layout's definition (vLLM source), not
through `split_kv_cache`, so a wrong layout interpretation fails here.
"""

import pytest
import torch

from vllm_longspec_kernels import (
    build_kv_cache_table,
    compact_kv_caches,
    compact_kv_caches_ref,
    split_kv_cache,
)

LAYOUTS = ["flash_nhd", "flash_hnd", "cpu", "separate"]


def make_caches(kit, layout, layers, nb, h, bs, d, dtype):
    """Random per-layer caches as vLLM allocates them for each layout."""
    caches = []
    for _ in range(layers):
        if layout == "flash_nhd":
            # vLLM 0.26 FlashAttention: logical (nb, H, bs, 2D), stride order (0, 2, 1, 3).
            phys = kit.randn(nb, bs, h, 2 * d).to(dtype)
            caches.append(phys.permute(0, 2, 1, 3))
        elif layout in ("flash_hnd", "cpu"):
            caches.append(kit.randn(nb, h, bs, 2 * d).to(dtype))
        else:
            caches.append((kit.randn(nb, bs, h, d).to(dtype), kit.randn(nb, bs, h, d).to(dtype)))
    return caches


def entry(cache, layout, slot, bs, d):
    """(K, V) of one token slot, [H, D] each, straight from the layout definition."""
    blk, off = divmod(slot, bs)
    if layout.startswith("flash"):
        # FlashAttention backend: kv_cache.transpose(1, 2).split(head_size, -1)
        return cache[blk, :, off, :d], cache[blk, :, off, d:]
    if layout == "cpu":
        # CPU backend: kv_cache.view(nb, H, 2 * bs, D).chunk(2, dim=2)
        rows = cache.reshape(cache.shape[0], cache.shape[1], 2 * bs, d)
        return rows[blk, :, off], rows[blk, :, bs + off]
    k, v = cache
    return k[blk, off], v[blk, off]


def kernel_layout(layout):
    return "flash" if layout.startswith("flash") else layout


def expected_after(caches, layout, src, dst, bs, d):
    """Applies the copies to clones, reading every source from the original (gather first)."""
    cloned = [tuple(c.clone() for c in x) if isinstance(x, tuple) else x.clone() for x in caches]
    for orig, new in zip(caches, cloned):
        for s, t in zip(src, dst):
            if s < 0 or t < 0:
                continue
            k_src, v_src = entry(orig, layout, s, bs, d)
            k_dst, v_dst = entry(new, layout, t, bs, d)
            k_dst.copy_(k_src)
            v_dst.copy_(v_src)
    return cloned


def flat(caches):
    return torch.cat([torch.cat([t.flatten() for t in c]) if isinstance(c, tuple) else
                      c.flatten() for c in caches])


def chain_pattern(kit, lo, hi):
    """Accepted path of a tree laid out after a committed prefix, within slots [lo, hi):
    dst[i] <= src[i], both increasing. Overlaps on purpose: an accepted node can sit in a slot
    that an earlier copy writes.
    """
    tree = kit.randint(6, min(40, hi - lo))
    base = kit.randint(lo, hi - tree)
    picked = sorted(torch.randperm(tree, generator=kit.gen)[:kit.randint(1, 6)].tolist())
    src = [base + p for p in picked]
    dst = [base + i for i in range(len(picked))]
    return src, dst


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chain_compaction_all_layers(kit, layout, dtype):
    layers, nb, h, bs, d = 3, 10, 2, 16, 32
    caches = make_caches(kit, layout, layers, nb, h, bs, d, dtype)
    # Two requests in one call (disjoint blocks) with a padding entry between them.
    src, dst = chain_pattern(kit, 0, 64)
    src2, dst2 = chain_pattern(kit, 96, 160)
    src_all, dst_all = src + [-1] + src2, dst + [5] + dst2
    expected = expected_after(caches, layout, src_all, dst_all, bs, d)
    s = torch.tensor(src_all, dtype=torch.int32, device=kit.device)
    t = torch.tensor(dst_all, dtype=torch.int64, device=kit.device)
    compact_kv_caches(caches, s, t, layout=kernel_layout(layout))
    assert torch.equal(flat(caches), flat(expected))


def test_fixed_size_calls_mostly_skipped(kit):
    # The V2 runner's calls: requests x depth entries, most (or all) -1. The all-skipped call
    # must leave every byte alone; a long call whose only live entries sit at its end (its tile
    # splits the head dim across programs) must still copy them.
    nb, h, bs, d = 8, 2, 16, 64
    caches = make_caches(kit, "flash_nhd", 2, nb, h, bs, d, torch.bfloat16)
    before = flat(caches).clone()
    skipped = torch.full((40,), -1, dtype=torch.int64, device=kit.device)
    compact_kv_caches(caches, skipped, skipped.clone(), layout="flash")
    assert torch.equal(flat(caches), before)
    src, dst = [-1] * 300, [-1] * 300
    src[-3:], dst[-3:] = [70, 71, 90], [64, 65, 66]
    expected = expected_after(caches, "flash_nhd", src, dst, bs, d)
    compact_kv_caches(caches, torch.tensor(src, device=kit.device),
                      torch.tensor(dst, device=kit.device), layout="flash")
    assert torch.equal(flat(caches), flat(expected))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_agrees(kit, layout):
    layers, nb, h, bs, d = 2, 6, 3, 16, 64
    caches = make_caches(kit, layout, layers, nb, h, bs, d, torch.float16)
    src, dst = chain_pattern(kit, 0, nb * bs)
    expected = expected_after(caches, layout, src, dst, bs, d)
    compact_kv_caches_ref(caches, torch.tensor(src), torch.tensor(dst),
                          layout=kernel_layout(layout))
    assert torch.equal(flat(caches), flat(expected))


def test_arbitrary_overlap_is_gather_then_scatter(kit):
    # A cyclic permutation (a -> b -> c -> a) is only right if all reads precede all writes.
    nb, h, bs, d = 4, 2, 16, 80
    caches = make_caches(kit, "flash_nhd", 2, nb, h, bs, d, torch.float16)
    src = [3, 17, 40, 63]
    dst = [17, 40, 63, 3]
    expected = expected_after(caches, "flash_nhd", src, dst, bs, d)
    compact_kv_caches(caches, torch.tensor(src, device=kit.device),
                      torch.tensor(dst, device=kit.device), layout="flash")
    assert torch.equal(flat(caches), flat(expected))


def test_prebuilt_table_reused_and_fp8(kit):
    fp8 = getattr(torch, "float8_e4m3fn", None)
    dtype = fp8 if fp8 is not None else torch.uint8
    nb, h, bs, d = 4, 2, 16, 32
    caches = [kit.randn(nb, h, bs, 2 * d).to(dtype) for _ in range(3)]
    table = build_kv_cache_table(caches, "cpu")
    assert table.table.shape == (3, 5) and table.elem_bytes == 1
    for _ in range(2):
        src, dst = chain_pattern(kit, 0, nb * bs)
        expected = expected_after(caches, "cpu", src, dst, bs, d)
        compact_kv_caches(table, torch.tensor(src, device=kit.device),
                          torch.tensor(dst, device=kit.device))
        assert torch.equal(flat(caches).view(torch.uint8), flat(expected).view(torch.uint8))


def test_split_views_share_memory(kit):
    cache = make_caches(kit, "cpu", 1, 2, 2, 16, 32, torch.float32)[0]
    k, v = split_kv_cache(cache, "cpu")
    assert k.shape == v.shape == (2, 16, 2, 32)
    k[1, 3, 1].fill_(5.0)
    assert (cache.view(2, 2, 32, 32)[1, 1, 3] == 5.0).all()
    v[0, 15, 0].fill_(6.0)
    assert (cache.view(2, 2, 32, 32)[0, 0, 31] == 6.0).all()


def test_mismatched_layers_rejected(kit):
    a = kit.randn(4, 2, 16, 64)
    b = kit.randn(4, 2, 16, 32)
    with pytest.raises(ValueError):
        build_kv_cache_table([a, b], "flash")


@pytest.mark.parametrize("d,dtype,unit", [(32, torch.bfloat16, 8), (34, torch.float16, 4),
                                          (3, torch.float32, 4), (5, torch.float16, 2)])
def test_copy_unit_is_the_widest_that_divides_rows_and_strides(kit, d, dtype, unit):
    # The kernel moves rows in 8/4/2/1-byte units (the widest every address, stride and row length
    # allows): a wrong unit would copy a partial or a neighbouring row.
    nb, h, bs = 4, 2, 16
    caches = make_caches(kit, "flash_nhd", 2, nb, h, bs, d, dtype)
    table = build_kv_cache_table(caches, "flash")
    assert table.unit_bytes == unit and table.row_units * unit == d * caches[0].element_size()
    src, dst = chain_pattern(kit, 0, nb * bs)
    expected = expected_after(caches, "flash_nhd", src, dst, bs, d)
    compact_kv_caches(table, torch.tensor(src, device=kit.device),
                      torch.tensor(dst, device=kit.device))
    assert torch.equal(flat(caches), flat(expected))


def test_misaligned_cache_view_falls_back_to_narrow_units(kit):
    # A cache starting 2 bytes into its storage cannot be copied in 8-byte units.
    nb, h, bs, d = 4, 2, 16, 32
    storage = kit.randn(nb * h * bs * 2 * d + 1).to(torch.float16)
    cache = storage[1:].view(nb, h, bs, 2 * d)
    table = build_kv_cache_table([cache], "flash")
    assert table.unit_bytes == 2
    src, dst = chain_pattern(kit, 0, nb * bs)
    expected = expected_after([cache], "flash_hnd", src, dst, bs, d)
    compact_kv_caches(table, torch.tensor(src, device=kit.device),
                      torch.tensor(dst, device=kit.device))
    assert torch.equal(flat([cache]), flat(expected))


def test_tiles_follow_the_measured_rule():
    from vllm_longspec_kernels.kv_compaction import compaction_tile

    assert compaction_tile(5, 32) == (16, 32, 4)          # one request's path: whole rows
    assert compaction_tile(40, 32) == (64, 32, 1)         # 8 requests: 2048 units, one warp
    assert compaction_tile(320, 32) == (512, 16, 4)       # 64 requests: 8192 units, 4 warps
    assert compaction_tile(5000, 32) == (8192, 1, 4)      # one unit column per program
    for n in (1, 17, 100, 700, 3000):
        block_t, block_d, warps = compaction_tile(n, 20)
        assert block_t >= n and block_d <= 32 and block_t * block_d <= 8192 and warps in (1, 4)
