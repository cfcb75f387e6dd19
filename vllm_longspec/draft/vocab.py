"""The draft's token frequencies, for drafting over a pruned vocabulary.

Each tree level multiplies the draft's hidden states by the target's whole ``lm_head``: five
levels over Qwen2.5's 151,936 tokens read 2.3 GB per step, the largest part of the drafting's
cost. Drafting over the most frequent N tokens only reads N/V of it. Drafts are proposals, so
this never changes the output (verification is exact); it only loses the drafts that a rare
token would have made.

`vllm-longspec train` stores how often each token occurred in its training data beside the
draft (``token_counts.safetensors``, one int64 tensor ``counts`` [vocab]); the published
layout (``config.json`` + ``model.safetensors``) is unchanged and a draft without the file
drafts over the whole vocabulary.
"""

from __future__ import annotations

import os

import torch

TOKEN_COUNTS_FILE = "token_counts.safetensors"


def save_token_counts(folder: str, counts: torch.Tensor) -> str:
    from safetensors.torch import save_file

    path = os.path.join(folder, TOKEN_COUNTS_FILE)
    save_file({"counts": counts.to(torch.int64).contiguous().cpu()}, path)
    return path


def load_token_counts(folder: str) -> torch.Tensor | None:
    """[vocab] int64 counts, or None when the draft has none."""
    path = os.path.join(folder, TOKEN_COUNTS_FILE) if os.path.isdir(folder) else \
        os.path.join(os.path.dirname(folder), TOKEN_COUNTS_FILE)
    if not os.path.exists(path):
        return None
    from safetensors.torch import load_file

    return load_file(path)["counts"]


def count_tokens(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64 occurrences of each id in `token_ids` (any shape)."""
    flat = token_ids.reshape(-1).to(torch.int64)
    flat = flat[(flat >= 0) & (flat < vocab_size)]
    return torch.bincount(flat, minlength=vocab_size)


def frequent_token_ids(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent ids (ties: lower id first), ascending. [size] int64."""
    if not 1 <= size <= counts.numel():
        raise ValueError(f"draft_vocab_size={size} must be in [1, {counts.numel()}]")
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    return order[:size].sort().values
