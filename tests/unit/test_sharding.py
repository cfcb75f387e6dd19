"""The TP-sharded draft equals the unsharded draft (2 processes over gloo).

Each rank loads its shard from one published (unsharded) checkpoint; cross-attention reads only
that rank's KV heads of a "target cache", as a TP rank's attention layer holds them. Hidden
states (after the row-parallel all-reduces), the ring K/V shards, the vocabulary-parallel tree
expansion (gathered candidates) and the broadcast acceptance are compared with the single-rank
computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_longspec.draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights
from vllm_longspec.draft.sharding import HeadShard, shard_state_dict
from vllm_longspec.testing.tp_check import (ARCH, WORLD, draft_forward, rank_main, sample_inputs,
                                            vocab_head)


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory) -> str:
    from vllm_longspec.draft.checkpoint import save_draft_checkpoint

    layer = init_draft_weights(LongSpecDraftLayer(ARCH), seed=11, std=0.1)
    with torch.no_grad():  # non-zero biases, so their slicing is checked too
        for name, p in layer.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return save_draft_checkpoint(layer, str(tmp_path_factory.mktemp("draft")), window=64)


@pytest.fixture(scope="module")
def ranks(draft_folder, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main,
                         args=(r, WORLD, str(out / "init"), draft_folder, str(out)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    errors = [open(out / f"rank{r}.err").read() for r in range(WORLD)
              if (out / f"rank{r}.err").exists()]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(draft_folder) -> dict:
    from vllm_longspec.draft.checkpoint import build_draft_layer, load_draft_checkpoint

    layer = build_draft_layer(load_draft_checkpoint(draft_folder))
    inp = sample_inputs()
    hidden, k, v = draft_forward(layer, inp, range(ARCH.num_key_value_heads))
    head = vocab_head(inp, 0, 1, None)
    level = head.expand_level(hidden, inp["scores"], 16)
    return dict(hidden=hidden, k=k, v=v, tokens=level.tokens, parents=level.parent_local,
                scores=level.scores, logprobs=head.log_probs(hidden))


def test_sharded_hidden_states_equal_unsharded(ranks, reference):
    for r in ranks:
        torch.testing.assert_close(r["hidden"], reference["hidden"], rtol=1e-5, atol=1e-5)
    # every rank holds the identical (all-reduced) result
    assert torch.equal(ranks[0]["hidden"], ranks[1]["hidden"])


def test_ring_kv_is_the_ranks_head_shard(ranks, reference):
    for r in ranks:
        lo, hi = r["kv_heads"]
        assert r["k"].shape[1] == ARCH.num_key_value_heads // WORLD
        torch.testing.assert_close(r["k"], reference["k"][:, lo:hi], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["v"], reference["v"][:, lo:hi], rtol=1e-5, atol=1e-5)


def test_vocab_parallel_expansion_equals_full_logits(ranks, reference):
    for r in ranks:
        assert torch.equal(r["tokens"], reference["tokens"])
        assert torch.equal(r["parents"], reference["parents"])
        torch.testing.assert_close(r["scores"], reference["scores"], rtol=1e-5, atol=1e-5)
        n = r["logprobs"].shape[1]
        torch.testing.assert_close(r["logprobs"],
                                   reference["logprobs"][:, r["start"]:r["start"] + n],
                                   rtol=1e-5, atol=1e-5)
    # the chosen tokens come from both shards (the gather matters)
    half = -(-ARCH.vocab_size // WORLD)
    tokens = reference["tokens"]
    assert bool((tokens < half).any()) and bool((tokens >= half).any())


def test_acceptance_is_rank_zeros_on_every_rank(ranks):
    for r in ranks:
        assert r["agreed"] == [([7, 8], [1]), ([3], [])]
    assert [r["disagreements"] for r in ranks] == [0, 1]


def test_tree_rows_are_those_every_rank_holds(ranks):
    assert [r["tree_rows"] for r in ranks] == [[2], [2]]
    assert [r["tree_rows_dropped"] for r in ranks] == [1, 1]


# ------------------------------------------------------------------ no processes needed
def test_head_shard_follows_vllm_split():
    arch = DraftArchitecture(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=8, intermediate_size=64, vocab_size=10)
    # KV heads >= TP: contiguous blocks; KV heads < TP: replicated, rank // (TP / Hk)
    assert [HeadShard.of(arch, r, 2).kv_heads for r in range(2)] == [range(0, 1), range(1, 2)]
    assert [HeadShard.of(arch, r, 4).kv_heads.start for r in range(4)] == [0, 0, 1, 1]
    assert [HeadShard.of(arch, r, 4).q_heads for r in range(4)] == [
        range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # each rank's queries belong to its KV heads (GQA group of 4)
    for r in range(4):
        s = HeadShard.of(arch, r, 4)
        assert {q // 4 for q in s.q_heads} == set(s.kv_heads)
    with pytest.raises(ValueError, match="query heads"):
        HeadShard.of(arch, 0, 3)


def test_shard_state_dict_slices_reassemble():
    layer = init_draft_weights(LongSpecDraftLayer(ARCH), seed=2)
    full = layer.state_dict()
    shards = [shard_state_dict(full, ARCH, HeadShard.of(ARCH, r, WORLD)) for r in range(WORLD)]
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if "layernorm" in name:
            assert all(torch.equal(p, tensor) for p in parts)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(parts, dim=1), tensor), name
        else:
            assert torch.equal(torch.cat(parts, dim=0), tensor), name
    local = HeadShard.of(ARCH, 0, WORLD).local_arch(ARCH)
    assert {k: tuple(v.shape) for k, v in shards[0].items()} == {
        k: tuple(v.shape) for k, v in LongSpecDraftLayer(local).state_dict().items()}
    assert np.prod(shards[0]["mlp.down_proj.weight"].shape) * WORLD == full[
        "mlp.down_proj.weight"].numel()
