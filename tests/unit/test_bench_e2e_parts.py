"""The end-to-end benchmark's engine-free parts: prompt windows (identical whatever else the run
measures), method settings, merging and the exactness report."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_longspec_benchmarks.e2e_methods import MethodOptions, build_method, build_methods
from vllm_longspec_benchmarks.e2e_prompts import (PromptBuilder, parse_context,
                                                  read_code_repos, window_indices)
from vllm_longspec_benchmarks.e2e_report import derive, merge_results, SCHEMA


def test_parse_context():
    assert parse_context("4k") == 4096
    assert parse_context("32K") == 32768
    assert parse_context(" 256 ") == 256


def test_windows_of_points_are_disjoint():
    used = [i for b in (1, 2, 4, 8, 16) for t in (0.0, 1.0) for i in window_indices(b, t)]
    assert len(used) == len(set(used))
    assert window_indices(1, 0.0) == [0]
    assert window_indices(4, 0.0) == [3, 4, 5, 6]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from vllm_longspec.testing.fixtures import make_tokenizer

    folder = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(folder, 320)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A small stand-in for the stdlib (tokenizing the real one costs half a minute here)."""
    root = tmp_path_factory.mktemp("stdlib")
    for pkg, n in (("asyncio", 3), ("json", 2), ("email", 1)):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text(f"# {pkg}\n")
        for i in range(n):
            body = "".join(f"def {pkg}_f{i}_{j}(x):\n    return x + {j}\n\n" for j in range(40))
            (root / pkg / f"m{i}.py").write_text(body)
    (root / "abc.py").write_text("class ABC:\n    pass\n" * 30)
    return str(root)


def test_prompts_do_not_depend_on_the_rest_of_the_run(tokenizer, code_dir, tmp_path):
    """A point's prompts are the same whether the run also has large batches (more windows)
    or not: separate --methods invocations must compare the same token ids."""
    small = PromptBuilder(tokenizer, 320, code_dir=code_dir, max_windows=1, max_context=300)
    large = PromptBuilder(tokenizer, 320, code_dir=code_dir, max_windows=64, max_context=2048,
                          cache_dir=str(tmp_path))
    for task in ("continue", "summary", "code"):
        a = small.point(task, 300, 1, 0.0)
        b = large.point(task, 300, 1, 0.0)
        assert a.prompts == b.prompts and a.sources == b.sources
        assert all(len(p) == 300 for p in a.prompts)
    batch = large.point("code", 300, 4, 1.0)
    assert len(batch.prompts) == 4 and len({tuple(p) for p in batch.prompts}) == 4
    # the cached token ids give the same prompts
    again = PromptBuilder(tokenizer, 320, code_dir=code_dir, max_windows=64,
                          max_context=2048, cache_dir=str(tmp_path))
    assert again.point("code", 300, 4, 1.0).prompts == batch.prompts


def test_code_repositories_and_cue(tokenizer, code_dir):
    from vllm_longspec_benchmarks.e2e_prompts import default_code_dir

    names = [name for name, _ in read_code_repos(default_code_dir())]
    assert names[:3] == ["asyncio", "email", "multiprocessing"] and names[-1] == "stdlib-modules"
    repos = read_code_repos(code_dir)
    assert [n for n, _ in repos] == ["asyncio", "email", "json", "stdlib-modules"]
    assert "# ---- file: asyncio/m0.py\ndef asyncio_f0_0" in repos[0][1]
    prompt = PromptBuilder(tokenizer, 320, code_dir=code_dir, max_context=500).point(
        "code", 500, 1, 0.0)
    assert prompt.sources == ["asyncio#0"]
    assert tokenizer.decode(prompt.prompts[0]).endswith("\n\n# Next function:\n")


def test_synthetic_prompts_without_tokenizer():
    builder = PromptBuilder(None, 320, max_windows=4, max_context=128)
    ps = builder.point("continue", 128, 2, 0.0)
    assert builder.source_kind == {"docs": "synthetic"}
    assert [len(p) for p in ps.prompts] == [128, 128]
    assert all(0 <= t < 320 for p in ps.prompts for t in p)


def test_methods():
    opts = MethodOptions(draft=None, tree_widths=[2, 4])
    methods = build_methods("longspec-tree,ngram8,nospec", opts)
    assert [m.name for m in methods] == ["nospec", "longspec-tree", "ngram8"]
    tree, ngram = methods[1], methods[2]
    assert tree.skip_reason and "--draft" in tree.skip_reason
    assert tree.speculative_config["num_speculative_tokens"] == 2
    assert tree.additional_config["longspec"]["tree_widths"] == [2, 4]
    assert ngram.speculative_config == {"method": "ngram", "num_speculative_tokens": 8,
                                        "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    assert build_method("longspec-chain6", opts).speculative_config[
        "num_speculative_tokens"] == 6
    lookup = build_method("longspec-lookup5", opts)
    assert lookup.speculative_config["num_speculative_tokens"] == 5
    assert lookup.additional_config["longspec"] == {"prompt_lookup_max": 4,
                                                    "prompt_lookup_min": 2,
                                                    "draft_model_tokens": 4}
    assert "draft_model_tokens" not in build_method("longspec-lookup", opts).additional_config[
        "longspec"]
    longer = build_method("longspec-lookup16d2", dataclasses.replace(opts, lookup_max=8))
    assert longer.speculative_config["num_speculative_tokens"] == 16
    assert longer.additional_config["longspec"] == {"prompt_lookup_max": 8,
                                                    "prompt_lookup_min": 2,
                                                    "draft_model_tokens": 2}
    for bad in ("longspec-chain4d2", "longspec-lookupd2"):
        with pytest.raises(ValueError, match="dD"):
            build_method(bad, opts)
    assert "prompt_lookup_max" not in build_method("longspec-chain", opts).additional_config[
        "longspec"]
    with pytest.raises(ValueError):
        build_method("eagle", opts)


def _point(task: str, tokens: list[list[int]], tok_s: float, **extra) -> dict:
    return {"task": task, "context": 100, "batch": len(tokens), "temperature": 0.0,
            "digests": [str(i) for i in range(len(tokens))], "token_ids": tokens,
            "decode_tok_s": tok_s, **extra}


def _result(methods: dict) -> dict:
    return {"schema": SCHEMA, "meta": {"target": "t"}, "methods": methods}


def test_merge_and_exactness():
    base = _result({"nospec": {"status": "ok", "points": [
        _point("code", [[1, 2, 3], [4, 5, 6]], 100.0,
               top2_gap=[[5.0, 5.0, 5.0], [5.0, 0.01, 5.0]])]}})
    spec = _result({"fast": {"status": "ok", "points": [
        _point("code", [[1, 2, 3], [4, 9, 6]], 150.0)]},
        "broken": {"status": "error", "error": "boom", "points": []}})
    merged = derive(merge_results([base, spec], ["a.json", "b.json"]), tie_gap=0.1)
    assert set(merged["methods"]) == {"nospec", "fast", "broken"}
    assert merged["methods"]["fast"]["points"][0]["speedup"] == pytest.approx(1.5)
    ex = merged["exactness"]["fast"]
    assert ex["requests"] == 2 and ex["identical"] == 1 and ex["exact_match_rate"] == 0.5
    assert ex["divergences"] == [{"task": "code", "context": 100, "batch": 2, "request": 1,
                                  "position": 1, "top2_gap": 0.01, "near_tie": True}]
    # other prompts (digests differ): no comparison at all
    other = _result({"fast": {"status": "ok", "points": [
        {**_point("code", [[1, 2, 3], [4, 5, 6]], 150.0), "digests": ["x", "y"]}]}})
    merged = derive(merge_results([base, other], ["a.json", "c.json"]))
    assert merged["methods"]["fast"]["points"][0]["speedup"] is None
    assert merged["exactness"]["fast"]["points_with_other_prompts"] == 1
    with pytest.raises(ValueError):
        merge_results([{"schema": "other", "meta": {}, "methods": {}}], ["x.json"])


def test_quick_preset_and_context_clipping():
    from vllm_longspec_benchmarks.bench_e2e import build_points, parse_args

    args = parse_args(["--target", "t", "--quick"])
    assert (args.contexts, args.batches, args.tasks, args.max_tokens, args.temperatures) == (
        "4k,16k,32k", "1", "continue,code", 128, "0,1")
    assert parse_args(["--target", "t", "--quick", "--max-tokens", "64"]).max_tokens == 64
    assert parse_args(["--target", "t"]).batches == "1,4,16"
    args = parse_args(["--target", "t", "--prompt-source", "synthetic", "--contexts", "256,4k",
                       "--batches", "1,2", "--temperatures", "0", "--tasks", "code",
                       "--max-tokens", "8"])
    points, info = build_points(args, {"vocab_size": 320}, max_model_len=1024)
    assert info["contexts"] == [{"prompt_tokens": 256, "requested": 256},
                                {"prompt_tokens": 1024 - 9 - 128, "requested": 4096}]
    assert [(p["context"], p["batch"]) for p in points] == [(256, 1), (256, 2), (887, 1),
                                                          (887, 2)]
    assert all(len(prompt) == p["context"] for p in points for prompt in p["prompts"])


def test_batches_limited_to_some_contexts_and_temperatures():
    from vllm_longspec_benchmarks.bench_e2e import build_points, parse_args

    args = parse_args(["--target", "t", "--prompt-source", "synthetic", "--contexts", "128,256",
                       "--batches", "1,4", "--temperatures", "0,1", "--tasks", "code",
                       "--max-tokens", "8", "--batch-contexts", "256", "--batch-temperatures", "0"])
    points, _ = build_points(args, {"vocab_size": 320}, max_model_len=1024)
    assert [(p["context"], p["batch"], p["temperature"]) for p in points] == [
        (128, 1, 0.0), (128, 1, 1.0), (256, 1, 0.0), (256, 1, 1.0), (256, 4, 0.0)]
    full, _ = build_points(parse_args(["--target", "t", "--prompt-source", "synthetic",
                                       "--contexts", "128,256", "--batches", "1,4",
                                       "--temperatures", "0,1", "--tasks", "code",
                                       "--max-tokens", "8"]),
                           {"vocab_size": 320}, max_model_len=1024)
    assert len(full) == 8
