"""The draft layer, its checkpoints, its ring buffer and its serving-time attention (no engine)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_longspec.draft.checkpoint import (DraftCheckpointError, build_draft_layer,
                                            load_draft_checkpoint, load_draft_header,
                                            save_draft_checkpoint)
from vllm_longspec.draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights
from vllm_longspec.draft.ring_cache import DraftKVRing
from vllm_longspec.engine.draft_attention import attend, ring_self_attention

ARCH = DraftArchitecture(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=50)


def _naive_attention(q, k, v, scale):
    """One query head at a time, float64, no GQA tricks."""
    hq, hk = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hk)].double(), v[:, h // (hq // hk)].double()
        for i in range(q.shape[0]):
            w = torch.softmax(q[i, h].double() @ kh.T * scale, dim=0)
            out[i, h] = w @ vh
    return out


def test_attend_matches_naive_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    out, lse = attend(q, k, v, 0.25)
    assert torch.allclose(out.double(), _naive_attention(q, k, v, 0.25), atol=1e-5)
    scores = torch.einsum("nhd,mhd->hnm", q, k.repeat_interleave(2, 1)) * 0.25
    assert torch.allclose(lse, torch.logsumexp(scores, -1).T, atol=1e-5)


def test_attend_empty_key_set_gives_zeros():
    q, k, v = torch.randn(2, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    mask = torch.tensor([[False] * 3, [True, False, False]])
    out, lse = attend(q, k, v, 0.25, mask)
    assert torch.all(out[0] == 0) and torch.all(torch.isinf(lse[0]))
    assert torch.allclose(out[1], v[0].repeat_interleave(2, 0))


def test_ring_keeps_last_window_and_rebuilds():
    ring = DraftKVRing(2, 4, 1, 2, torch.float32, "cpu")
    rows = ring.rows(["a", "b"], keep={"a", "b"})
    pos = torch.arange(10)
    vals = pos.float()[:, None, None].expand(10, 1, 2)
    ring.write(torch.full((4,), rows[0]), pos[6:], vals[6:], vals[6:])
    ring.mark_filled("a", 10)
    assert sorted(ring.k[rows[0], :, 0, 0].tolist()) == [6.0, 7.0, 8.0, 9.0]
    assert ring.valid_counts(["a", "b"]) == [4, 0]
    with pytest.raises(RuntimeError):
        ring.rows(["c"], keep={"a", "b", "c"})
    new = ring.rows(["c"], keep={"c"})  # evicts a request that left the batch
    assert len(new) == 1 and ring.filled("c") == 0
    ring.release(["c"])
    assert ring.nbytes_per_request == 4 * 1 * 2 * 4 * 2


def test_ring_self_attention_equals_full_attention_over_window():
    torch.manual_seed(1)
    window = 5
    ring = DraftKVRing(1, window, 2, 16, torch.float32, "cpu")
    row = ring.rows(["r"], keep={"r"})[0]
    k_all, v_all = torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    ring.write(torch.full((window,), row), torch.arange(4, 9), k_all[4:], v_all[4:])
    extra_k, extra_v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    q = torch.randn(1, 4, 16)
    out = ring_self_attention(q, ring.k, ring.v, torch.tensor([row]), torch.tensor([window]),
                              extra_k, extra_v, 0.25)
    ref = _naive_attention(q, torch.cat([k_all[4:], extra_k[0]]),
                           torch.cat([v_all[4:], extra_v[0]]), 0.25)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_draft_cross_attention_reads_through_block_table():
    from vllm_longspec_kernels import attend_paged_prefix

    torch.manual_seed(2)
    block_size, num_blocks = 4, 6
    cache_k, cache_v = torch.randn(num_blocks, block_size, 2, 16), torch.randn(num_blocks, block_size, 2, 16)
    table = torch.tensor([[5, 2, 0], [1, 3, 4]], dtype=torch.int32)
    q = torch.randn(3, 4, 16)
    out, lse = attend_paged_prefix(q, cache_k, cache_v, table, torch.tensor([6, 0], dtype=torch.int32),
                                   torch.tensor([0, 2, 3], dtype=torch.int32), 0.25,
                                   max_seqlen_q=2, max_prefix_len=6, backend="torch")
    seq_k = torch.cat([cache_k[5], cache_k[2]])[:6]
    seq_v = torch.cat([cache_v[5], cache_v[2]])[:6]
    assert torch.allclose(out[:2].double(), _naive_attention(q[:2], seq_k, seq_v, 0.25), atol=1e-5)
    assert torch.all(out[2] == 0) and torch.all(torch.isinf(lse[:, 2]))


def test_checkpoint_round_trip_and_reference_layout(tmp_path):
    layer = init_draft_weights(LongSpecDraftLayer(ARCH), seed=3)
    folder = save_draft_checkpoint(layer, str(tmp_path / "d"), window=128)
    loaded = build_draft_layer(load_draft_checkpoint(folder))
    for (n1, p1), (n2, p2) in zip(layer.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert load_draft_header(folder).window == 128
    # the reference trainer's format: a prefixed state dict with the unused cross k/v
    ref = tmp_path / "ref"
    ref.mkdir()
    state = {f"draft_model.{k}": v for k, v in layer.state_dict().items()}
    state["draft_model.cross_attn.k_proj.weight"] = torch.zeros(32, 64)
    state["draft_model.cross_attn.v_proj.bias"] = torch.zeros(32)
    torch.save(state, ref / "draft_model_weights.pth")
    with open(tmp_path / "d" / "config.json") as f:
        config = json.load(f)
    with open(ref / "config.json", "w") as f:
        json.dump({k: v for k, v in config.items() if k != "longspec"}, f)
    again = build_draft_layer(load_draft_checkpoint(str(ref / "draft_model_weights.pth")))
    assert torch.equal(again.mlp.up_proj.weight, layer.mlp.up_proj.weight)


def test_bad_checkpoints_are_named(tmp_path):
    layer = init_draft_weights(LongSpecDraftLayer(ARCH), seed=3)
    with torch.no_grad():
        layer.mlp.down_proj.weight[0, 0] = float("nan")
    folder = save_draft_checkpoint(layer, str(tmp_path / "nan"), window=64)
    with pytest.raises(DraftCheckpointError, match="mlp.down_proj.weight contains NaN"):
        build_draft_layer(load_draft_checkpoint(folder))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 128
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(DraftCheckpointError, match="wrong shapes"):
        load_draft_header(folder)
    with pytest.raises(DraftCheckpointError, match="does not exist"):
        load_draft_header(str(tmp_path / "missing"))


def test_zero_output_draft_predicts_embedding_bigram():
    layer = init_draft_weights(LongSpecDraftLayer(ARCH), seed=4, zero_outputs=True)
    emb = torch.randn(3, 64)

    def rope(pos, q, k):
        return q, k

    out = layer(emb, torch.arange(3), rope, lambda q, k, v: torch.randn_like(q),
                lambda q: torch.randn_like(q))
    assert torch.equal(out, emb)


def test_grouped_ring_attention_equals_per_query_ring_attention():
    """The drafting's grouped self-attention (ring read once per request, GQA broadcast) is the
    per-query reference, for ring-only (level 0) and ring + tree-ancestor keys."""
    from vllm_longspec.engine.draft_attention import (grouped_ring_self_attention,
                                                      ring_self_attention)

    gen = torch.Generator().manual_seed(3)
    batch, n, hq, hk, d, window, rows, extra = 3, 4, 6, 2, 16, 8, 5, 7
    q = torch.randn(batch, n, hq, d, generator=gen)
    ring_k = torch.randn(rows, window, hk, d, generator=gen)
    ring_v = torch.randn(rows, window, hk, d, generator=gen)
    request_rows = torch.tensor([4, 0, 2])
    valid = torch.tensor([8, 3, 0])  # full, partly filled, empty ring
    extra_k = torch.randn(batch, extra, hk, d, generator=gen)
    extra_v = torch.randn(batch, extra, hk, d, generator=gen)
    mask = torch.rand(batch, n, extra, generator=gen) < 0.5
    mask[2, 1] = False  # a query of the empty-ring request that sees nothing
    flat_rows = request_rows.repeat_interleave(n)
    flat_valid = valid.repeat_interleave(n)
    for with_extra in (False, True):
        grouped = grouped_ring_self_attention(
            q, ring_k, ring_v, request_rows, valid, extra_k if with_extra else None,
            extra_v if with_extra else None, 0.25, mask if with_extra else None)
        reference = ring_self_attention(
            q.reshape(-1, hq, d), ring_k, ring_v, flat_rows, flat_valid,
            extra_k.repeat_interleave(n, dim=0) if with_extra else None,
            extra_v.repeat_interleave(n, dim=0) if with_extra else None, 0.25,
            mask.reshape(batch * n, extra) if with_extra else None)
        assert torch.isfinite(grouped).all()
        torch.testing.assert_close(grouped.reshape(-1, hq, d), reference, rtol=1e-5, atol=1e-5)


def test_weight_check_leaves_the_process_safe_to_fork(tmp_path):
    """vLLM forks its engine core from the process that ran the weight check; a fork after
    torch's intra-op thread team has started hangs the child's first parallel CPU op."""
    import subprocess
    import sys

    big = DraftArchitecture(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=128, intermediate_size=2048, vocab_size=50)
    folder = save_draft_checkpoint(init_draft_weights(LongSpecDraftLayer(big)),
                                   str(tmp_path / "big"), window=64)
    script = f"""
import os, sys, time, torch
from vllm_longspec.draft.checkpoint import check_draft_weights
check_draft_weights({folder!r})
pid = os.fork()
if pid == 0:
    torch.zeros(4_000_000).fill_(1.0).sum()
    os._exit(0)
deadline = time.time() + 20
while time.time() < deadline:
    if os.waitpid(pid, os.WNOHANG)[0]:
        sys.exit(0)
    time.sleep(0.05)
os.kill(pid, 9)
sys.exit(3)
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 0
