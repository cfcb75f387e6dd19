"""A draft trained by `vllm-longspec train` loads in a real vLLM engine and stays lossless;
`min_prompt_len` turns speculation off for short prompts."""

from __future__ import annotations

import json
import os
import random

import torch

from vllm_longspec.draft.checkpoint import load_draft_checkpoint
from vllm_longspec.testing.engines import generate
from vllm_longspec.testing.fixtures import make_word_corpus
from vllm_longspec.train.cli import main as train_main


def test_trained_draft_runs_losslessly_in_vllm(tmp_path, tiny_models):
    target = tiny_models["qwen"]
    corpus = make_word_corpus(str(tmp_path / "corpus"), num_docs=20)
    out = str(tmp_path / "draft")
    rc = train_main(["--target", target, "--data", corpus, "--output", out, "--steps", "12",
                     "--seq-len", "64", "--batch-size", "4", "--window", "64", "--loss", "distill",
                     "--eval-every", "0", "--eval-tokens", "256", "--no-progress",
                     "--device", "cpu"])
    assert rc == 0
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["completed"] and summary["steps"] == 12
    trained = load_draft_checkpoint(out)
    assert trained.window == 64
    untrained = load_draft_checkpoint(tiny_models["zero_draft_qwen"])
    assert not torch.equal(trained.state_dict["mlp.down_proj.weight"],
                           untrained.state_dict["mlp.down_proj.weight"])

    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (9, 90, 300)]
    engine = dict(max_model_len=512, max_num_seqs=4)
    base = generate(target, prompts, max_tokens=24, **engine)
    spec = generate(target, prompts, max_tokens=24,
                    speculative_config={"method": "longspec", "model": out,
                                        "num_speculative_tokens": 3}, **engine)
    assert spec.token_ids == base.token_ids
    assert spec.counters["num_drafts"] > 0

    # min_prompt_len: the 9- and 90-token prompts decode without speculation
    short_off = generate(target, prompts, max_tokens=24,
                         speculative_config={"method": "longspec", "model": out,
                                             "num_speculative_tokens": 3},
                         additional_config={"longspec": {"min_prompt_len": 100}}, **engine)
    assert short_off.token_ids == base.token_ids
    assert 0 < short_off.counters["num_drafts"] < spec.counters["num_drafts"]
