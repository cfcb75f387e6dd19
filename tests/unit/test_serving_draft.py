"""The serving form of the draft (fused layer, FlashAttention-shaped ring attention, chain
drafting) against the reference definitions, in fp32 on the CPU."""

from __future__ import annotations

import sys
import os

import pytest
import torch

from vllm_longspec.compat.fused_ops import FusedOps
from vllm_longspec.draft.model import LongSpecDraftLayer, RMSNorm, init_draft_weights
from vllm_longspec.engine.draft_attention import attend, grouped_ring_self_attention
from vllm_longspec.engine.draft_graphs import DraftInputs
from vllm_longspec.engine.ring_attention import ring_attention
from vllm_longspec.engine.serving_layer import ServingDraftLayer

sys.path.insert(0, os.path.dirname(__file__))
from test_device_proposer import ARCH, MAX_LEN, _block_table, _drafter  # noqa: E402

OPS = FusedOps(use_cuda_kernels=False)


def test_fused_ops_torch_paths_match_the_reference_modules():
    torch.manual_seed(0)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    assert torch.allclose(OPS.rms_norm(x, norm.weight, 1e-6), norm(x), atol=1e-6)
    normed, total = OPS.add_rms_norm(x.clone(), residual.clone(), norm.weight, 1e-6)
    assert torch.allclose(total, x + residual) and torch.allclose(normed, norm(x + residual),
                                                                  atol=1e-6)
    gate_up = torch.randn(5, 2 * 48)
    expected = torch.nn.functional.silu(gate_up[:, :48]) * gate_up[:, 48:]
    assert torch.allclose(OPS.silu_and_mul(gate_up), expected)


def test_serving_layer_equals_the_reference_layer():
    torch.manual_seed(1)
    reference = init_draft_weights(LongSpecDraftLayer(ARCH), seed=5, std=0.2)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(("bias", "layernorm.weight")):
                param.add_(torch.randn_like(param) * 0.1)  # non-trivial biases and norms
    serving = ServingDraftLayer(reference, OPS)
    embeds, positions = torch.randn(6, ARCH.hidden_size), torch.arange(6) * 7
    keys = torch.randn(9, ARCH.num_key_value_heads, ARCH.head_dim)

    def rope(pos, q, k):  # any position-dependent map will do; both layers get the same
        scale = (1 + pos.float() / 100).unsqueeze(-1)
        return (None if q is None else q * scale), (None if k is None else k * scale)

    def self_attend(q, k, v):
        return attend(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.3)[0][0]

    def cross_attend(q):
        return attend(q.unsqueeze(0), keys.unsqueeze(0), keys.unsqueeze(0), 0.3)[0][0]

    expected = reference(embeds.clone(), positions, rope, self_attend, cross_attend)
    got = serving(embeds.clone(), positions, rope, self_attend, cross_attend)
    assert torch.allclose(got, expected, atol=1e-5)
    for a, b in zip(serving.self_kv(embeds, positions, rope),
                    reference.self_kv(embeds, positions, rope)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("with_scratch", [False, True])
def test_ring_attention_equals_the_reference(with_scratch):
    torch.manual_seed(2)
    batch, n, hq, hk, d, window = 3, 4, 4, 2, 16, 8
    ring_k, ring_v = torch.randn(5, window, hk, d), torch.randn(5, window, hk, d)
    rows, valid = torch.tensor([4, 0, 2]), torch.tensor([8, 3, 1])
    q = torch.randn(batch, n, hq, d)
    scratch_k = scratch_v = visible = None
    if with_scratch:
        scratch_k, scratch_v = torch.randn(batch, 6, hk, d), torch.randn(batch, 6, hk, d)
        visible = torch.rand(batch, n, 6) < 0.5
    got = ring_attention(q, ring_k, ring_v, rows, valid, scratch_k, scratch_v, 0.25, visible)
    expected = grouped_ring_self_attention(q, ring_k, ring_v, rows, valid, scratch_k, scratch_v,
                                           0.25, visible)
    assert torch.allclose(got, expected, atol=1e-5)


def test_chain_drafting_equals_the_general_tree_loop():
    drafter = _drafter()
    torch.manual_seed(3)
    drafter.ring.k.normal_()
    drafter.ring.v.normal_()
    inputs = DraftInputs.from_requests(roots=[3, 17], ring_rows=[1, 3], ring_valid=[8, 5],
                                       root_positions=[30, 4], prefix_lens=[30, 4],
                                       block_table=_block_table([1, 3]))
    tokens, parents = drafter.draft_chain(inputs, MAX_LEN)
    tree_tokens, tree_parents = drafter._draft_levels(inputs, MAX_LEN)
    assert torch.equal(tokens, tree_tokens) and torch.equal(parents, tree_parents)
    assert tokens.shape == (2, 3) and parents[0].tolist() == [-1, 0, 1, 2]
