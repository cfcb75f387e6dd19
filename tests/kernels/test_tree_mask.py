"""Tree bitmask construction: host builder, on-device builder and unpacking agree with ancestry."""

import pytest
import torch

from vllm_longspec_kernels import (
    build_tree_mask,
    tree_mask_from_parents,
    tree_mask_num_words,
    unpack_tree_mask,
)


def ancestry(parents: list[int]) -> torch.Tensor:
    """Brute force: vis[i, j] iff j == i or j is reached by walking up from i."""
    n = len(parents)
    vis = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            vis[i, j] = True
            j = parents[j]
    return vis


@pytest.mark.parametrize("kind", ["random", "beam", "star", "forest", "chain"])
def test_build_matches_brute_force(kit, kind):
    # Sizes straddle word boundaries (31/32/33, 64, 100) so bit 31 (the int32 sign bit) is used.
    sizes = [1, 31, 32, 33, 64, kit.randint(65, 128)]
    parents = [kit.parents(n, kind) for n in sizes]
    words = tree_mask_num_words(max(sizes))
    assert words == (max(sizes) + 31) // 32
    mask = build_tree_mask(parents, num_words=words)
    assert mask.dtype == torch.int32 and mask.shape == (sum(sizes), words)
    cu = kit.cu_seqlens(sizes).cpu()
    for par, vis in zip(parents, unpack_tree_mask(mask, cu)):
        assert torch.equal(vis, ancestry(par))


def test_bit_layout_is_documented_one(kit):
    # Node 33 of a chain sees nodes 0..33: word 0 all ones (-1 as int32), word 1 = 0b11.
    mask = build_tree_mask([list(range(-1, 40))], num_words=2)
    assert mask[33].tolist() == [-1, 3]
    assert mask[0].tolist() == [1, 0]


@pytest.mark.parametrize("kind", ["random", "beam", "forest", "star"])
def test_device_builder_matches_host_builder(kit, kind):
    sizes = [kit.randint(1, 70) for _ in range(4)] + [1, 69]
    parents = [kit.parents(n, kind) for n in sizes]
    words = tree_mask_num_words(max(sizes))
    expected = build_tree_mask(parents, num_words=words)
    flat = torch.tensor([p for par in parents for p in par], dtype=torch.int32, device=kit.device)
    got = tree_mask_from_parents(flat, kit.cu_seqlens(sizes), words)
    assert torch.equal(got.cpu(), expected)


def test_chains_longer_than_window_are_causal(kit):
    # A prefill chunk (chain of 80) next to a tree of 20 nodes: W = 1 covers the tree only.
    tree = kit.parents(20, "random")
    chain = list(range(-1, 79))
    mask = build_tree_mask([tree, chain])
    assert mask.shape == (100, 1)
    vis_tree, vis_chain = unpack_tree_mask(mask, kit.cu_seqlens([20, 80]).cpu())
    assert torch.equal(vis_tree, ancestry(tree))
    assert torch.equal(vis_chain, torch.ones(80, 80, dtype=torch.bool).tril())
    flat = torch.tensor(tree + chain, dtype=torch.int32, device=kit.device)
    got = tree_mask_from_parents(flat, kit.cu_seqlens([20, 80]), 1)
    assert torch.equal(got.cpu(), mask)


def test_all_chains_need_no_words():
    mask = build_tree_mask([[-1], [-1, 0, 1]])
    assert mask.shape == (4, 0)


@pytest.mark.parametrize("bad", [[-1, 1], [0], [-1, 0, 3], [-1, -2]])
def test_invalid_parents_rejected(bad):
    with pytest.raises(ValueError):
        build_tree_mask([bad])


def test_non_chain_past_window_rejected(kit):
    with pytest.raises(ValueError):
        build_tree_mask([kit.parents(40, "star")], num_words=1)
