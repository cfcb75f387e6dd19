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


def test_tree_drafting_hands_the_rotary_kernel_dense_positions():
    """vLLM's rotary kernel reads positions as a dense array: a stride-0 view (an expanded
    position of one request) makes it read past the tensor (an illegal address on the GPU)."""
    drafter = _drafter(widths=(2, 3, 3), depth=3)
    rope, seen = drafter.rope, []

    def checking_rope(positions, q, k):
        seen.append((positions.is_contiguous(), positions.stride(), positions.tolist()))
        return rope(positions, q, k)

    drafter.rope = checking_rope
    inputs = DraftInputs.from_requests(roots=[3], ring_rows=[1], ring_valid=[8],
                                       root_positions=[30], prefix_lens=[30],
                                       block_table=_block_table([1]))
    drafter._draft_levels(inputs, MAX_LEN)
    # self- and cross-attention rotate at every level
    assert [s[2] for s in seen] == [[30], [30], [31] * 2, [31] * 2, [32] * 3, [32] * 3]
    assert all(contiguous for contiguous, _, _ in seen), seen


def test_fp8_weights_dequantise_to_the_loaded_weights():
    from vllm_longspec.engine.draft_linear import FP8_MAX, DraftLinear, quantize_fp8_per_channel

    torch.manual_seed(4)
    weight = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of unequal scale
    quantized, scale = quantize_fp8_per_channel(weight)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    assert float(quantized.float().abs().max()) <= FP8_MAX
    restored = quantized.float() * scale[:, None]
    # E4M3 keeps 3 mantissa bits: each weight within 1/16 of itself (relative) per row scale
    assert torch.allclose(restored, weight, rtol=0.07, atol=float(scale.max()) * 2 ** -6)
    bias = torch.randn(48)
    linear = DraftLinear(weight, bias, fp8=True)
    assert linear.nbytes == weight.numel()  # one byte per weight
    x = torch.randn(5, 64)
    exact = torch.nn.functional.linear(x, weight, bias)
    got = linear.reference(x)
    assert float((got - exact).norm() / exact.norm()) < 0.05
    assert torch.equal(DraftLinear(weight, bias).reference(x), exact)


def test_fp8_draft_weights_are_refused_where_there_is_no_fp8_matmul():
    from vllm_longspec.config import LongSpecConfig, LongSpecConfigError
    from vllm_longspec.engine.draft_linear import fp8_matmul_available

    with pytest.raises(LongSpecConfigError, match="draft_weight_dtype must be one of auto, fp8"):
        LongSpecConfig(draft="/d", num_speculative_tokens=2, draft_weight_dtype="int4")
    assert LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 2,
                                     "draft_weight_dtype": "fp8"}).draft_weight_dtype == "fp8"
    if not torch.cuda.is_available():
        assert not fp8_matmul_available(0)
