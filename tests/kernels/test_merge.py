"""LSE merge: equals attention over the union of the key sets; empty sides never produce NaN."""

import pytest
import torch

from vllm_longspec_kernels import merge_attn_states, merge_attn_states_ref

INF = float("inf")


def partial_attention(q, k, v):
    """q [T, H, D], k/v [T, H, L, D] (per-token keys) -> out [T, H, D], lse [H, T] (float64)."""
    scores = torch.einsum("thd,thld->thl", q.double(), k.double())
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("thl,thld->thd", torch.softmax(scores, -1), v.double())
    return out, lse.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,d", [(3, 32), (8, 80), (32, 128)])
def test_merge_equals_union_attention(kit, dtype, heads, d):
    tokens, la, lb = 7, kit.randint(1, 9), kit.randint(1, 9)
    q = kit.randn(tokens, heads, d, dtype=torch.float64) / d ** 0.25
    ka, va = kit.randn(tokens, heads, la, d, dtype=torch.float64), kit.randn(tokens, heads, la, d,
                                                                             dtype=torch.float64)
    kb, vb = kit.randn(tokens, heads, lb, d, dtype=torch.float64), kit.randn(tokens, heads, lb, d,
                                                                             dtype=torch.float64)
    oa, lse_a = partial_attention(q, ka, va)
    ob, lse_b = partial_attention(q, kb, vb)
    full, lse_full = partial_attention(q, torch.cat([ka, kb], 2), torch.cat([va, vb], 2))
    out = torch.full((tokens, heads, d), float("nan"), dtype=dtype, device=kit.device)
    out, lse = merge_attn_states(oa.to(dtype), lse_a.float(), ob.to(dtype), lse_b.float(), out=out)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Two roundings to `dtype` (the partial outputs, then the merged one) are relative errors:
    # with a single key per side an output is a raw N(0, 1) value, |x| up to ~4.5, where one bf16
    # rounding alone is up to 2^-8 * 4.5 = 0.018.
    rel = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    assert ((out.double() - full).abs() - rel * full.abs()).max() <= kit.out_atol[dtype]
    assert (lse.double() - lse_full).abs().max() <= 1e-5
    ref_out, ref_lse = merge_attn_states_ref(oa, lse_a, ob, lse_b)
    assert (ref_out - full).abs().max() <= 1e-10


def test_empty_sides_never_nan(kit):
    tokens, heads, d = 6, 4, 32
    oa = kit.randn(tokens, heads, d)
    ob = kit.randn(tokens, heads, d)
    lse_a = kit.randn(heads, tokens)
    lse_b = kit.randn(heads, tokens)
    # token 0: prefix empty (-inf), garbage output; token 1: FA2-style +inf for an empty prefix;
    # token 2: suffix empty; token 3: both empty; token 4: both empty via +inf.
    lse_a[:, 0] = -INF
    oa[0] = float("nan")
    lse_a[:, 1] = INF
    oa[1] = float("nan")
    lse_b[:, 2] = -INF
    ob[2] = float("nan")
    lse_a[:, 3] = -INF
    lse_b[:, 3] = -INF
    oa[3] = ob[3] = float("nan")
    lse_a[:, 4] = INF
    lse_b[:, 4] = INF
    out, lse = merge_attn_states(oa, lse_a, ob, lse_b)
    ref_out, ref_lse = merge_attn_states_ref(oa, lse_a, ob, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0], ob[0])
    torch.testing.assert_close(out[1], ob[1])
    torch.testing.assert_close(lse[:, 0], lse_b[:, 0])
    torch.testing.assert_close(out[2], oa[2])
    torch.testing.assert_close(lse[:, 2], lse_a[:, 2])
    assert (out[3:5] == 0).all() and (lse[:, 3:5] == -INF).all()
    torch.testing.assert_close(out.double(), ref_out.to(out.device), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.to(lse.device), atol=1e-5, rtol=1e-5)


def test_nan_in_a_used_side_propagates(kit):
    # NaNs must not be silently hidden when the side has non-zero weight.
    oa, ob = kit.randn(2, 2, 32), kit.randn(2, 2, 32)
    oa[0, 0, 3] = float("nan")
    out, _ = merge_attn_states(oa, kit.randn(2, 2), ob, kit.randn(2, 2))
    assert torch.isnan(out[0, 0, 3]) and torch.isfinite(out[1]).all()


def test_strided_inputs_and_no_lse(kit):
    # FlashAttention outputs can be views; LSEs may be transposed views.
    tokens, heads, d = 5, 3, 64
    big = kit.randn(tokens, heads * 2, d)
    oa = big[:, ::2]
    ob = kit.randn(tokens, heads, d)
    lse_a = kit.randn(tokens, heads).T
    lse_b = kit.randn(heads, tokens)
    out, lse = merge_attn_states(oa, lse_a, ob, lse_b, return_lse=False)
    assert lse is None
    ref_out, _ = merge_attn_states_ref(oa, lse_a, ob, lse_b)
    assert (out.double() - ref_out).abs().max() <= 1e-5
