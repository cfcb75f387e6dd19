"""Sampling (temperature 1) with LongSpec (chain and tree) follows the target's distribution.

The bigram fixture is the hardest case for a sampler: its draft always proposes the target's
mode. We sample many continuations of one prompt through a real engine with LongSpec and compare
the distribution of the 2nd and 3rd generated tokens (both decided by speculative verification)
with the exact marginals computed from the target in fp32 (chi-square). The same test applied
to a deliberately broken rule (accept every draft) must fail, which shows the test has power.
The tree run offers three deterministic candidates per node (the draft's top-3, which are the
target's top-3): the sequential multi-candidate rule must still reproduce the marginals.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vllm_longspec.testing.engines import generate

NUM_SAMPLES = 3000
PROMPT = [random.Random(3).randrange(256) for _ in range(40)]


def exact_marginals(target_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p(x1), p(x2) and p(x3) of the target at temperature 1 (fp32, transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        prompt = torch.tensor([PROMPT])
        p1 = model(prompt).logits[0, -1].softmax(-1).double()
        vocab = p1.shape[0]
        seqs = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        p2_given_1 = model(seqs).logits[:, -1].softmax(-1).double()   # [x1, x2]
        p2 = p1 @ p2_given_1
        # x3: the bigram target depends on x2 only (checked below), so p(x3|x2) suffices
        p3_given_2 = model(torch.cat([seqs, torch.arange(vocab)[:, None]], 1)).logits[:, -1]
    return p1.numpy(), p2.numpy(), (p2 @ p3_given_2.softmax(-1).double()).numpy()


def chi_square_pvalue(samples: list[int], probs: np.ndarray) -> float:
    from scipy.stats import chi2

    counts = np.bincount(samples, minlength=probs.shape[0]).astype(float)
    expected = probs * len(samples)
    order = np.argsort(expected)
    # pool the rarest tokens so that every bin expects at least 5 samples
    bins_obs, bins_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for t in order:
        acc_o += counts[t]
        acc_e += expected[t]
        if acc_e >= 5:
            bins_obs.append(acc_o)
            bins_exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        bins_obs[-1] += acc_o
        bins_exp[-1] += acc_e
    obs, exp = np.array(bins_obs), np.array(bins_exp)
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(obs) - 1))


@pytest.fixture(scope="module")
def sampled(tiny_models):
    m = tiny_models
    run = generate(m["bigram_llama"], [PROMPT] * NUM_SAMPLES, max_tokens=3, temperature=1.0,
                   max_model_len=256, max_num_seqs=256,
                   speculative_config={"method": "longspec", "model": m["zero_draft_llama"],
                                       "num_speculative_tokens": 2})
    return run


@pytest.fixture(scope="module")
def sampled_tree(tiny_models):
    m = tiny_models
    return generate(m["bigram_llama"], [PROMPT] * NUM_SAMPLES, max_tokens=3, temperature=1.0,
                    max_model_len=256, max_num_seqs=256,
                    speculative_config={"method": "longspec", "model": m["zero_draft_llama"],
                                        "num_speculative_tokens": 2},
                    additional_config={"longspec": {"tree_widths": [3, 3]}})


def test_longspec_tree_sampling_matches_target(sampled_tree, tiny_models):
    pytest.importorskip("scipy")
    _, p2, p3 = exact_marginals(tiny_models["bigram_llama"])
    assert sampled_tree.counters["num_drafts"] > 0
    x2 = [t[1] for t in sampled_tree.token_ids]
    x3 = [t[2] for t in sampled_tree.token_ids]
    assert chi_square_pvalue(x2, p2) > 1e-3
    assert chi_square_pvalue(x3, p3) > 1e-3
    assert 0 < sampled_tree.acceptance_rate < 1


def test_longspec_sampling_matches_target(sampled, tiny_models):
    pytest.importorskip("scipy")
    _, p2, p3 = exact_marginals(tiny_models["bigram_llama"])
    assert sampled.counters["num_drafts"] > 0
    x2 = [t[1] for t in sampled.token_ids]
    x3 = [t[2] for t in sampled.token_ids]
    assert chi_square_pvalue(x2, p2) > 1e-3
    assert chi_square_pvalue(x3, p3) > 1e-3
    # some drafts were rejected: the sampler really had to correct them
    assert 0 < sampled.acceptance_rate < 1


def test_broken_rule_fails_the_same_test(tiny_models):
    """'Accept every draft': the bigram draft's proposal is the target's mode given x1."""
    pytest.importorskip("scipy")
    from transformers import AutoModelForCausalLM

    p1, p2, _ = exact_marginals(tiny_models["bigram_llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["bigram_llama"],
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        vocab = p1.shape[0]
        mode_after = model(torch.arange(vocab)[:, None]).logits[:, -1].argmax(-1).numpy()
    rng = np.random.default_rng(0)
    x1 = rng.choice(vocab, size=NUM_SAMPLES, p=p1 / p1.sum())
    broken_x2 = [int(mode_after[t]) for t in x1]
    assert chi_square_pvalue(broken_x2, p2) < 1e-6
