"""Engine-free parts of the GPU scripts: merging step-cost rows from logs, comparing runs."""

from __future__ import annotations

import json

import pytest

from vllm_longspec_benchmarks.bench_step_cost import main as step_cost_main
from vllm_longspec_benchmarks.bench_step_cost import rows_from_logs
from vllm_longspec_benchmarks.gpu_v2_trees import compare


def _row(context, variant, ms):
    return {"context": context, "variant": variant, "step_ms": ms, "per_token_ms": ms,
            "decode_steps": 8, "mean_acceptance_length": 1.0}


def test_step_cost_rows_merge_from_logs(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("engines: 0%|  |ROW " + json.dumps(_row(32768, "plain", 6.0)) + "\n"
                     "noise\nROW " + json.dumps(_row(32768, "tree", 12.0)) + "\n"
                     "ROW " + json.dumps(_row(131072, "plain", 9.5)) + "\n")
    second.write_text("ROW " + json.dumps(_row(131072, "plain", 9.0)) + "\n"
                      "ROW " + json.dumps(_row(131072, "tree", 18.0)) + "\n")
    rows = rows_from_logs([str(first), str(second)])
    assert len(rows) == 4 and [r["step_ms"] for r in rows if r["context"] == 131072] == [9.0, 18.0]
    out = tmp_path / "out"
    assert step_cost_main(["--merge-logs", str(first), str(second), "--out", str(out)]) == 0
    report = json.loads((out / "step_cost.json").read_text())
    ratios = {(r["context"], r["variant"]): r["x_plain_step"] for r in report["rows"]}
    assert ratios[(32768, "tree")] == 2.0 and ratios[(131072, "tree")] == 2.0
    assert (out / "step_cost.png").exists()


def test_step_cost_report_with_a_variant_measured_at_one_context_only(tmp_path):
    log = tmp_path / "a.txt"
    log.write_text("".join("ROW " + json.dumps(_row(*row)) + "\n" for row in (
        (32768, "plain", 6.0), (32768, "tree 69", 10.5), (32768, "tree 64", 9.0),
        (131072, "plain", 9.0), (131072, "tree 64", 15.3))))
    out = tmp_path / "out"
    assert step_cost_main(["--merge-logs", str(log), "--out", str(out)]) == 0
    report = json.loads((out / "step_cost.json").read_text())
    assert [r["variant"] for r in report["rows"] if r["context"] == 131072] == ["plain", "tree 64"]
    assert (out / "step_cost.png").stat().st_size > 0


def test_compare_reports_divergences_with_the_plain_runs_gap():
    base = {"token_ids": [[1, 2, 3], [4, 5, 6], [7, 8]],
            "top2_gap": [[0.5, 0.5, 0.5], [0.9, 0.01, 0.4], [1.0, 1.0]]}
    spec = {"token_ids": [[1, 2, 3], [4, 9, 6], [7, 8, 9]]}
    result = compare(base, spec)
    assert result["exact"] == 1 and result["of"] == 3
    first, second = result["divergences"]
    assert (first["request"], first["first_divergence"], first["top2_gap"]) == (1, 1, 0.01)
    assert second["first_divergence"] is None and second["len"] == (2, 3)
    assert compare(base, spec, only=[0])["exact"] == 1


def test_profile_kernel_table_counts_graph_kernels_per_step_and_families():
    from vllm_longspec_benchmarks.profile_step import kernel_family, kernel_table

    trace = {"traceEvents": [
        {"cat": "kernel", "name": "nvjet_sm90_tst_128x8", "ts": 0.0, "dur": 10.0},
        {"cat": "kernel", "name": "flash::FlashAttnFwdSm90", "ts": 10.0, "dur": 30.0},
        {"cat": "kernel", "name": "_compact_kv_kernel", "ts": 100.0, "dur": 50.0},
        {"cat": "kernel", "name": "nvjet_sm90_tst_128x8", "ts": 150.0, "dur": 10.0},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 500.0},  # not a kernel
    ]}
    table = kernel_table(trace, steps=2)
    assert table["busy_ms"] == 0.05 and table["span_ms"] == 0.08
    top = table["kernels"][0]
    assert top["kernel"] == "_compact_kv_kernel" and top["gpu_ms"] == 0.025
    gemm = next(r for r in table["kernels"] if r["kernel"].startswith("nvjet"))
    assert gemm["count"] == 1.0 and gemm["gpu_ms"] == 0.01
    families = {r["family"]: r["gpu_ms"] for r in table["families"]}
    assert families["GEMM"] == 0.01 and families["attention: FlashAttention"] == 0.015
    assert kernel_family("void at::native::sbtopk::gatherTopK") == "top-k / sort"
    assert kernel_family("_group_top_k_kernel") == "top-k / sort"  # level_topk
    assert kernel_family("_compact_kv_kernel").startswith("Triton")
    assert kernel_family("triton_red_fused_fused_add_rms_norm_0").startswith("Triton")
    assert kernel_family("void at::native::vectorized_elementwise_kernel<4>").startswith("torch")
    assert kernel_family("void vllm::rotary_embedding_kernel<c10::BFloat16>").startswith("vLLM")
    assert kernel_table({"traceEvents": []}, steps=1)["kernels"] == []


def test_kv_compaction_bench_pairs_move_to_unique_destinations():
    import torch

    from vllm_longspec_benchmarks.bench_kv_compaction import make_pairs

    generator = torch.Generator().manual_seed(0)
    for entries, moving in [(5, 0), (5, 5), (68, 5), (544, 40), (3, 1)]:
        src, dst = make_pairs(entries, moving, 4096, generator, "cpu")
        live = src >= 0
        assert src.shape == dst.shape == (entries,)
        assert int(live.sum()) == moving and torch.equal(live, dst >= 0)
        assert len(set(dst[live].tolist())) == moving
        if moving > 1:  # one source is another entry's destination (gather-then-scatter)
            assert set(src[live].tolist()) & set(dst[live].tolist())


def test_every_registered_benchmark_module_exists():
    import importlib

    from vllm_longspec.bench import BENCHMARKS

    for name, module in BENCHMARKS.items():
        assert callable(importlib.import_module(f"vllm_longspec_benchmarks.{module}").main), name


def test_phase_kernel_time_follows_launches_into_nested_phases():
    from vllm_longspec_benchmarks.profile_step import phase_kernel_time

    def annotation(name, ts, dur, tid=1):
        return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(correlation, ts, tid=1):
        return {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": ts, "dur": 1,
                "tid": tid, "args": {"correlation": correlation}}

    def kernel(correlation, dur):  # on the GPU's own timeline, long after its launch
        return {"cat": "kernel", "name": "k", "ts": 10_000 + correlation, "dur": dur, "tid": 7,
                "args": {"correlation": correlation}}

    trace = {"traceEvents": [
        annotation("step", 0, 100), annotation("propose", 50, 30),
        annotation("step", 200, 100), annotation("propose", 250, 30),
        launch(1, 10), launch(2, 60), launch(3, 210), launch(4, 260), launch(5, 500),
        kernel(1, 1000.0), kernel(2, 2000.0), kernel(3, 1000.0), kernel(4, 2000.0),
        kernel(5, 500.0), kernel(6, 300.0),  # 5: launched outside; 6: no launch recorded
    ]}
    rows = {r["phase"]: r for r in phase_kernel_time(trace, steps=2)}
    assert rows["step"]["inclusive_ms"] == 3.0 and rows["step"]["exclusive_ms"] == 1.0
    assert rows["propose"]["inclusive_ms"] == 2.0 and rows["propose"]["exclusive_ms"] == 2.0
    assert rows["propose"]["calls"] == 1.0 and rows["propose"]["inclusive_ms_per_call"] == 2.0
    assert rows["(outside phases)"]["inclusive_ms"] == 0.4


def test_kv_compaction_bench_paths_move_within_each_request_like_the_engine():
    import torch

    from vllm_longspec_benchmarks.bench_kv_compaction import (TREE_DEPTH, TREE_NODES,
                                                             make_path_pairs)

    src, dst = make_path_pairs(8, 1 << 14, torch.Generator().manual_seed(1), "cpu")
    assert src.shape == dst.shape == (8 * TREE_DEPTH,)
    live = src >= 0
    assert torch.equal(live, dst >= 0) and int(live.sum()) > 0
    assert len(set(dst[live].tolist())) == int(live.sum())
    # every move goes back towards the root, inside one request's tree slots
    assert bool((src[live] > dst[live]).all())
    assert bool(((src[live] // 128) == (dst[live] // 128)).all())
    assert bool((src[live] % 128 < TREE_NODES).all())
    depth = torch.arange(1, TREE_DEPTH + 1).repeat(8)
    assert torch.equal(dst[live] % 128, depth[live])


def test_gpu_v2_trees_fails_only_on_its_own_runs_errors(tmp_path):
    from vllm_longspec_benchmarks.gpu_v2_trees import main as v2_trees_main

    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": {
        "base_bigram": {"token_ids": [[1, 2]], "counters": {}},
        "tree_bigram_v2": {"token_ids": [[1, 2]], "counters": {"mean_acceptance_length": 2.0},
                           "model_runner": "V2"},
        "tree_drift_v2_graphs": {"error": "exit 1 (an earlier lease)"}}}))
    out = tmp_path / "out"
    assert v2_trees_main(["--only", "none", "--runs-from", str(earlier), "--out", str(out)]) == 0
    summary = json.loads((out / "gpu_v2_trees.json").read_text())["summary"]
    assert summary["tree_bigram_v2"]["exact"] == 1


def test_step_cost_tree_variants_cross_bookkeeping_and_topk_paths():
    from vllm_longspec_benchmarks.bench_step_cost import tree_variants

    variants = tree_variants(["4,16,11"], ["v2"], ["fused"], ["triton", "torch"], "DRAFT",
                             {"draft_vocab_size": 32768}, ", vocab 32k")
    assert [name for name, *_ in variants] == ["tree 4,16,11, vocab 32k (v2, triton top-k)",
                                               "tree 4,16,11, vocab 32k (v2, torch top-k)"]
    (_, spec, additional, env), (_, _, _, torch_env) = variants
    assert spec == {"method": "longspec", "model": "DRAFT", "num_speculative_tokens": 3}
    assert additional == {"longspec": {"tree_widths": [4, 16, 11], "draft_vocab_size": 32768}}
    assert env == {"LONGSPEC_TREE_RUNNER": "v2", "LONGSPEC_BEAM_TOPK": "triton"}
    assert torch_env == {"LONGSPEC_TREE_RUNNER": "v2", "LONGSPEC_BEAM_TOPK": "torch"}
    default, = tree_variants(["4"], ["v1"], ["torch"], ["default"], "DRAFT", {}, "")
    assert default[0] == "tree 4 (v1, torch bookkeeping)"
    assert default[3] == {"LONGSPEC_TREE_RUNNER": "v1", "LONGSPEC_TREE_BOOKKEEPING": "torch"}
    with pytest.raises(ValueError, match="--beam-topk"):
        tree_variants(["4"], ["v2"], ["fused"], ["cuda"], "DRAFT", {}, "")
