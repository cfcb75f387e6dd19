"""LongSpecConfig and the rewrite of a LongSpec request into vLLM's config (no engine)."""

from __future__ import annotations

import argparse

import pytest

from vllm_longspec.config import LongSpecConfig, LongSpecConfigError
from vllm_longspec.draft.checkpoint import DraftCheckpointError
from vllm_longspec.engine.spec_config import (PROPOSER_CLASS, add_cli_flags, apply_cli_flags,
                                              resolve_longspec, wants_longspec)
from vllm_longspec.testing.fixtures import read_hf_config


def test_defaults_and_chain():
    cfg = LongSpecConfig(draft="/d", num_speculative_tokens=4)
    assert cfg.window == 512 and cfg.min_prompt_len == 0 and cfg.tree_widths is None
    assert cfg.num_draft_tokens == 4 and cfg.level_widths == (1, 1, 1, 1) and not cfg.is_tree


def test_tree_counts_nodes():
    cfg = LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 5,
                                    "tree_widths": [4, 16, 16, 16, 16]})
    assert cfg.num_draft_tokens == 68 and cfg.is_tree


@pytest.mark.parametrize("options, message", [
    ({"num_speculative_tokens": 4, "windw": 3}, "unknown LongSpec option"),
    ({"num_speculative_tokens": 4, "window": 0}, "window=0 is out of range"),
    ({"num_speculative_tokens": 4, "window": "big"}, "window must be an integer"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens=0 is out of range"),
    ({"num_speculative_tokens": 3, "tree_widths": [4, 16]}, "depth must equal"),
    ({"num_speculative_tokens": 5, "tree_widths": [64, 64, 64, 1, 1]}, "tree too big"),
    ({"num_speculative_tokens": 2, "tree_widths": [4, 0]}, "tree_widths[1]=0"),
    ({"num_speculative_tokens": 2, "tree_widths": "4,x"}, "integers separated by commas"),
    ({"num_speculative_tokens": 2, "min_prompt_len": -1}, "min_prompt_len=-1"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(LongSpecConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LongSpecConfig.from_dict({"draft": "/d", **options})


def test_tree_widths_imply_depth():
    cfg = LongSpecConfig.from_user_options("/d", None, {"tree_widths": "4,16,16"})
    assert cfg.num_speculative_tokens == 3


def test_conflicting_values_are_rejected():
    with pytest.raises(LongSpecConfigError, match="given twice"):
        LongSpecConfig.from_user_options("/d", 4, {"num_speculative_tokens": 5})


def test_request_detection(tiny_models):
    assert wants_longspec({"method": "longspec", "model": "x"})
    assert wants_longspec({"model": "longspec"})
    assert wants_longspec({"model": tiny_models["zero_draft_llama"]})
    assert not wants_longspec({"method": "ngram", "num_speculative_tokens": 3})
    assert not wants_longspec({"model": tiny_models["bigram_llama"]})  # a plain model folder
    assert not wants_longspec(None)


def test_resolve_rewrites_to_custom_class(tiny_models):
    spec, cfg = resolve_longspec(
        {"method": "longspec", "model": tiny_models["zero_draft_llama"],
         "num_speculative_tokens": 3},
        {"longspec": {"min_prompt_len": 10}}, read_hf_config(tiny_models["bigram_llama"]))
    assert spec == {"method": "custom_class", "model": PROPOSER_CLASS,
                    "num_speculative_tokens": 3}
    assert cfg.min_prompt_len == 10 and cfg.window == 512  # the draft's own window
    assert cfg.draft == tiny_models["zero_draft_llama"]


def test_missing_draft_folder():
    with pytest.raises(DraftCheckpointError, match="does not exist"):
        resolve_longspec({"method": "longspec", "model": "/nonexistent/draft",
                          "num_speculative_tokens": 2}, None, {})


def test_draft_for_another_target(tiny_models):
    with pytest.raises(DraftCheckpointError, match="made for another target: .*vocab_size"):
        other = dict(read_hf_config(tiny_models["bigram_llama"]), vocab_size=512)
        resolve_longspec({"method": "longspec", "model": tiny_models["zero_draft_llama"],
                          "num_speculative_tokens": 2}, None, other)
    with pytest.raises(DraftCheckpointError, match="num_key_value_heads"):
        other = dict(read_hf_config(tiny_models["bigram_llama"]), num_key_value_heads=4)
        resolve_longspec({"method": "longspec", "model": tiny_models["zero_draft_llama"],
                          "num_speculative_tokens": 2}, None, other)


def test_cli_flags_fold_into_engine_args(tiny_models):
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    args = parser.parse_args(["--speculative-model", "longspec", "--longspec-draft", "/d",
                              "--longspec-tree-widths", "4,16", "--longspec-window", "128"])

    class EngineArgs:
        speculative_config = None
        additional_config = {}

    ea = EngineArgs()
    apply_cli_flags(ea, args)
    assert ea.speculative_config == {"method": "longspec", "model": "/d"}
    assert ea.additional_config == {"longspec": {"tree_widths": "4,16", "window": 128}}

    args = parser.parse_args(["--longspec-window", "128"])
    with pytest.raises(LongSpecConfigError, match="need --speculative-model"):
        apply_cli_flags(EngineArgs(), args)


def test_draft_vocab_size_is_validated():
    from vllm_longspec.config import LongSpecConfig, LongSpecConfigError

    ok = LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 2,
                                   "tree_widths": [4, 16], "draft_vocab_size": 4096})
    assert ok.draft_vocab_size == 4096
    with pytest.raises(LongSpecConfigError, match="draft_vocab_size"):
        LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 2,
                                  "tree_widths": [4, 16], "draft_vocab_size": 8})  # < width 16
    with pytest.raises(LongSpecConfigError, match="draft_vocab_size"):
        LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 2,
                                  "draft_vocab_size": "many"})


def test_prompt_lookup_is_validated_and_reaches_the_config_from_the_cli():
    ok = LongSpecConfig.from_dict({"draft": "/d", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    assert (ok.prompt_lookup_max, ok.prompt_lookup_min) == (4, 2)
    assert LongSpecConfig(draft="/d", num_speculative_tokens=4).prompt_lookup_max == 0  # off
    with pytest.raises(LongSpecConfigError, match="prompt_lookup_min=5 is out of range"):
        LongSpecConfig(draft="/d", num_speculative_tokens=4, prompt_lookup_max=4,
                       prompt_lookup_min=5)
    with pytest.raises(LongSpecConfigError, match="prompt_lookup_max=99 is out of range"):
        LongSpecConfig(draft="/d", num_speculative_tokens=4, prompt_lookup_max=99)
    with pytest.raises(LongSpecConfigError, match="chains only.*tree_widths"):
        LongSpecConfig(draft="/d", num_speculative_tokens=2, tree_widths=(4, 16),
                       prompt_lookup_max=3)

    short = LongSpecConfig(draft="/d", num_speculative_tokens=8, prompt_lookup_max=4,
                           draft_model_tokens=3)
    assert short.drafted_level_widths == (1, 1, 1) and short.num_draft_tokens == 8
    assert ok.drafted_level_widths == ok.level_widths == (1, 1, 1, 1)
    with pytest.raises(LongSpecConfigError, match="needs a chain.*prompt_lookup_max > 0"):
        LongSpecConfig(draft="/d", num_speculative_tokens=8, draft_model_tokens=3)
    with pytest.raises(LongSpecConfigError, match="draft_model_tokens=9 is out of range"):
        LongSpecConfig(draft="/d", num_speculative_tokens=8, prompt_lookup_max=4,
                       draft_model_tokens=9)

    from vllm.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    args = parser.parse_args(["--speculative-model", "longspec", "--longspec-draft", "/d",
                              "--longspec-prompt-lookup-max", "4",
                              "--longspec-draft-model-tokens", "2"])
    ea = EngineArgs()
    apply_cli_flags(ea, args)
    assert ea.additional_config == {"longspec": {"prompt_lookup_max": 4,
                                                 "draft_model_tokens": 2}}


def test_frequent_token_ids_and_counts(tmp_path):
    import torch

    from vllm_longspec.draft.vocab import (count_tokens, frequent_token_ids,
                                           load_token_counts, save_token_counts)

    counts = count_tokens(torch.tensor([[5, 5, 5, 2], [2, 9, 7, 7]]), 10)
    assert counts.tolist() == [0, 0, 2, 0, 0, 3, 0, 2, 0, 1]
    assert frequent_token_ids(counts, 3).tolist() == [2, 5, 7]  # ties: lower id first
    assert load_token_counts(str(tmp_path)) is None
    save_token_counts(str(tmp_path), counts)
    assert load_token_counts(str(tmp_path)).tolist() == counts.tolist()
    with pytest.raises(ValueError, match="draft_vocab_size"):
        frequent_token_ids(counts, 11)


def test_pruned_vocab_head_maps_columns_back_to_token_ids():
    import torch

    from vllm_longspec.engine.vocab_head import DraftVocabHead, VocabShard

    ids = torch.tensor([3, 8, 11])
    weight = torch.eye(3)
    head = DraftVocabHead(lambda h: h @ weight.T, VocabShard(0, 3, 3), token_ids=ids)
    hidden = torch.tensor([[0.0, 5.0, 1.0]])  # column 1 best, then column 2
    grown = head.expand_level(hidden, torch.zeros(1, 1), 2)
    assert grown.tokens.tolist() == [[8, 11]]
