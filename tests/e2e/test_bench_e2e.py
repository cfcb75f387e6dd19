"""`vllm-longspec bench e2e` on real vLLM engines (tiny fp32 models, CPU): every requested
method and metric lands in the JSON, LongSpec's greedy output equals nospec's token for token,
a method that fails at start-up is recorded and the others still run, the plots are drawn, and
partial runs (separate --methods invocations) merge into one comparison.

Prompts come from a small archive and a small "stdlib" made here: the real ones (13 MB of text)
take longer to tokenize byte by byte than the engines take to run.
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from vllm_longspec_benchmarks import bench_e2e
from vllm_longspec_benchmarks.e2e_report import PLOTS

TASKS = ["continue", "summary", "code"]
BATCHES = [1, 2]
TEMPS = [0.0, 1.0]
MAX_TOKENS = 8
POINT_METRICS = ["t1_s", "tN_s", "decode_tok_s", "per_request_tok_s", "tokens_per_step",
                 "token_latency_ms", "step_latency_ms", "counters", "mean_acceptance_length",
                 "sources", "digests"]


def _inputs(root) -> tuple[str, str]:
    """A longtexts-like archive (Debian reference first) and a package-shaped code folder."""
    words = ("the system package manager installs configuration files while the user edits "
             "sources and the kernel boots with options chosen at install time").split()
    texts = root / "texts"
    texts.mkdir()
    for i, name in enumerate(["debian-reference.en", "persuasion", "emma"]):
        lines = [" ".join(words[(j * 7 + i) % len(words):] + words[:(j * 7 + i) % len(words)])
                 for j in range(120)]
        (texts / f"{name}.txt").write_text("\n".join(lines))
    archive = root / "longtexts.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(texts, arcname=".")
    code = root / "stdlib"
    for pkg in ("asyncio", "json"):
        (code / pkg).mkdir(parents=True)
        (code / pkg / "__init__.py").write_text(f'"""{pkg}"""\n')
        (code / pkg / "core.py").write_text("".join(
            f"def {pkg}_{j}(value, scale={j}):\n    return value * scale + {j}\n\n"
            for j in range(200)))
    return str(archive), str(code)


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_e2e")
    archive, code = _inputs(root)
    common = ["--target", tiny_models["qwen"], "--dtype", "float32", "--eager",
              "--contexts", "256", "--max-tokens", str(MAX_TOKENS), "--repeats", "1",
              "--batches", ",".join(map(str, BATCHES)), "--temperatures", "0,1",
              "--tasks", ",".join(TASKS), "--longtexts", archive, "--code-dir", code,
              "--cache-dir", str(root / "cache")]
    out = {k: str(root / k) for k in ("a", "b", "merged", "replot")}
    # part a: the reference and a stock method; part b: LongSpec, a tree too big to start
    # (its engine refuses it) and suffix (skipped where arctic_inference is missing)
    assert bench_e2e.main(common + ["--methods", "nospec,ngram4", "--out", out["a"]]) == 0
    assert bench_e2e.main(common + ["--methods", "longspec-chain,longspec-tree,suffix",
                                    "--draft", tiny_models["zero_draft_qwen"],
                                    "--longspec-tree-widths", "100,100",
                                    "--out", out["b"]]) == 0
    assert bench_e2e.main(["--merge", os.path.join(out["a"], "e2e.json"),
                           os.path.join(out["b"], "e2e.json"), "--out", out["merged"]]) == 0
    assert bench_e2e.main(["--replot", os.path.join(out["merged"], "e2e.json"),
                           "--out", out["replot"]]) == 0
    loaded = {}
    for key in ("a", "b", "merged"):
        with open(os.path.join(out[key], "e2e.json")) as f:
            loaded[key] = json.load(f)
    return loaded, out


def test_every_method_and_metric(runs):
    results, _ = runs
    a, b = results["a"], results["b"]
    assert a["meta"]["vllm_version"] and a["meta"]["torch_version"] and a["meta"]["date"]
    assert "--methods nospec,ngram4" in a["meta"]["command"]
    assert a["meta"]["device_name"].startswith("CPU")
    assert a["meta"]["prompts"]["source_kind"] == {"docs": "text", "code": "text"}
    expected = {(t, 256, bs, temp) for t in TASKS for bs in BATCHES for temp in TEMPS}
    for result, name in ((a, "nospec"), (a, "ngram4"), (b, "longspec-chain")):
        method = result["methods"][name]
        assert method["status"] == "ok", method.get("error")
        keys = {(p["task"], p["context"], p["batch"], p["temperature"])
                for p in method["points"]}
        assert keys == expected
        for p in method["points"]:
            assert "error" not in p
            for metric in POINT_METRICS:
                assert metric in p, (name, metric)
            assert p["decode_tok_s"] > 0 and p["tN_s"] > p["t1_s"] > 0
            assert p["token_latency_ms"]["p50"] > 0
            assert p["token_latency_ms"]["p90"] >= p["token_latency_ms"]["p50"]
            assert p["decode_tok_s"] == pytest.approx(p["per_request_tok_s"] * p["batch"])
            if p["temperature"] == 0:
                assert [len(t) for t in p["token_ids"]] == [MAX_TOKENS + 1] * p["batch"]
        assert method["engine"]["startup_s"] > 0
        assert method["memory"]["kv_cache_bytes"] > 0
    chain = b["methods"]["longspec-chain"]
    assert all(p["mean_acceptance_length"] >= 1.0 and p["counters"]["num_drafts"] > 0
               for p in chain["points"])
    assert chain["settings"]["speculative_config"]["method"] == "longspec"
    for p in a["methods"]["nospec"]["points"]:
        assert p["mean_acceptance_length"] is None
        if p["temperature"] == 0:
            assert [len(g) for g in p["top2_gap"]] == [MAX_TOKENS + 1] * p["batch"]


def test_a_failing_method_does_not_stop_the_others(runs):
    results, _ = runs
    tree = results["b"]["methods"]["longspec-tree"]
    assert tree["status"] == "error" and tree["points"] == []
    assert "tree too big" in tree["error"]
    suffix = results["b"]["methods"]["suffix"]
    assert suffix["status"] in ("ok", "skipped")


def test_longspec_is_exact_and_merge_compares_across_runs(runs):
    results, out = runs
    merged = results["merged"]
    assert set(merged["methods"]) == {"nospec", "ngram4", "longspec-chain", "longspec-tree",
                                      "suffix"}
    assert len(merged["parts"]) == 2
    greedy_requests = len(TASKS) * sum(BATCHES)
    for name in ("longspec-chain", "ngram4"):
        ex = merged["exactness"][name]
        assert ex["requests"] == greedy_requests
        assert ex["exact_match_rate"] == 1.0, ex["divergences"]
        assert ex["points_with_other_prompts"] == 0
    # the speedups need nospec from the other file: same prompts, so every point has one
    assert all(p["speedup"] is not None and p["speedup"] > 0
               for p in merged["methods"]["longspec-chain"]["points"])
    # part b alone has no nospec to compare with
    assert "longspec-chain" not in results["b"]["exactness"]
    with open(os.path.join(out["merged"], "e2e.md")) as f:
        table = f.read()
    for name in merged["methods"]:
        assert f"| {name} |" in table
    assert f"| longspec-chain | {greedy_requests} | {greedy_requests} | 1.000 |" in table


def test_plots(runs):
    _, out = runs
    for key in ("a", "merged", "replot"):
        for name in PLOTS:
            path = os.path.join(out[key], name)
            assert os.path.getsize(path) > 10_000, path
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
