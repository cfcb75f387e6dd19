"""Config-only target folders of real model shapes (weights come from ``load_format="dummy"``)
and an untrained draft for them: cost measurements without downloading anything."""

from __future__ import annotations

import json
import os

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=262144, torch_dtype="bfloat16",
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    # Qwen2.5-Coder-1.5B-Instruct (the real pair's target)
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, torch_dtype="bfloat16", tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=151643, eos_token_id=151645),
}


def shape_folder(shape: str, root: str) -> str:
    """Writes ``root/<shape>-shape/config.json`` and returns the folder."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    folder = os.path.join(root, f"{shape}-shape")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f, indent=1)
    return folder


def untrained_draft(root: str, target: str) -> str:
    """A random LongSpec draft for `target` (cost only: it accepts almost nothing), with token
    counts that rank lower ids as more frequent (so ``draft_vocab_size`` can be measured)."""
    import torch

    from vllm_longspec.draft.vocab import save_token_counts
    from vllm_longspec.testing.fixtures import make_tiny_draft

    name = os.path.basename(os.path.normpath(target))
    folder = make_tiny_draft(os.path.join(root, f"untrained_draft-{name}"), target, seed=11)
    with open(os.path.join(target, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    save_token_counts(folder, torch.arange(vocab, 0, -1))
    return folder
