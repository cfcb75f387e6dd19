"""Shared fixtures: tiny models built once per session, vLLM engines run in-process."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_models(models_dir):
    """Targets and drafts for the acceptance scenarios:

    - bigram_llama + zero_draft_llama: every draft accepted;
    - qwen + zero_draft_qwen: partial acceptance (the target drifts from its bigram);
    - qwen + random_draft_qwen: almost nothing accepted.
    """
    from vllm_longspec.testing.fixtures import make_tiny_draft, make_tiny_target

    paths = {
        "bigram_llama": make_tiny_target(f"{models_dir}/bigram_llama", "llama",
                                         residual_scale=0.0, seed=0),
        "qwen": make_tiny_target(f"{models_dir}/qwen", "qwen2", residual_scale=0.15, seed=1),
    }
    paths["zero_draft_llama"] = make_tiny_draft(f"{models_dir}/zero_draft_llama",
                                                paths["bigram_llama"], zero_outputs=True)
    paths["zero_draft_qwen"] = make_tiny_draft(f"{models_dir}/zero_draft_qwen", paths["qwen"],
                                               zero_outputs=True)
    paths["random_draft_qwen"] = make_tiny_draft(f"{models_dir}/random_draft_qwen",
                                                 paths["qwen"], seed=7)
    return paths
