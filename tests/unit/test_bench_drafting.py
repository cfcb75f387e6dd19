"""`bench drafting` runs end to end on the CPU (the GPU numbers come from the same code)."""

from __future__ import annotations

import json

from vllm_longspec.draft.model import DraftArchitecture
from vllm_longspec_benchmarks.bench_drafting import SHAPES_HERE, categorise, floor_bytes, main


def test_bench_drafting_writes_its_numbers_and_plot(tmp_path):
    assert main(["--shape", "tiny", "--contexts", "64,256", "--tree-widths", "2,3",
                 "--window", "16", "--reps", "2", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "bench_drafting.json").read_text())
    assert [r["context"] for r in records] == [64, 256]
    assert all(r["eager_ms"] > 0 for r in records)
    assert records[1]["floor_bytes"] > records[0]["floor_bytes"]  # more target K/V to read
    assert (tmp_path / "bench_drafting.png").stat().st_size > 0


def test_floor_counts_weights_per_level_and_the_prefix():
    arch = DraftArchitecture.from_hf_config(SHAPES_HERE["llama3-8b"])
    one = floor_bytes(arch, 1, 0, 32768)
    # Llama-3-8B's draft layer (q|k|v, o, cross q, cross o, gate|up, down) + 32k head rows
    assert one == 2 * (4096 * 6144 + 3 * 4096 * 4096 + 3 * 4096 * 14336 + 32768 * 4096)
    assert floor_bytes(arch, 5, 0, 32768) == 5 * one
    assert floor_bytes(arch, 1, 1000, 32768) - one == 2 * 1000 * 1024 * 2
    assert floor_bytes(arch, 1, 0, 32768, weight_bytes=1) * 2 == one


def test_kernels_are_sorted_into_kinds():
    kinds = categorise([
        {"kernel": "void cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", "launches": 2,
         "us": 10.0},
        {"kernel": "nvjet_sm90_tst_256x16_64x6_2x1_v_bz_TNT", "launches": 1, "us": 5.0},
        {"kernel": "at::native::mbtopk::computeDigitCumSum", "launches": 4, "us": 3.0},
        {"kernel": "void vllm::rotary_embedding_kernel<>", "launches": 1, "us": 1.0},
        {"kernel": "_final_top_k_kernel", "launches": 1, "us": 2.0}])
    assert kinds["attention"] == {"launches": 2, "us": 10.0}
    assert kinds["matmul"]["us"] == 5.0 and kinds["top-k"]["launches"] == 5
    assert kinds["norm/rope"]["launches"] == 1
