"""Broken copies of a good LongSpec draft, for start-up refusal tests.

Each function writes a new draft folder `dst` from the good draft `src` (or, for a draft made
for another target, from the target's config) and returns `dst`.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..draft.checkpoint import CONFIG_FILE, WEIGHTS_FILE


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def truncated(src: str, dst: str) -> str:
    """model.safetensors cut to half its size (an interrupted download)."""
    _copy(src, dst)
    path = os.path.join(dst, WEIGHTS_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return dst


def corrupt(src: str, dst: str) -> str:
    """model.safetensors overwritten with bytes that are no safetensors file."""
    _copy(src, dst)
    path = os.path.join(dst, WEIGHTS_FILE)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(bytes((i * 131 + 7) % 256 for i in range(min(size, 4096))))
    return dst


def without_weights(src: str, dst: str) -> str:
    """A folder with config.json only."""
    _copy(src, dst)
    os.remove(os.path.join(dst, WEIGHTS_FILE))
    return dst


def with_bad_value(src: str, dst: str, value: float = float("nan")) -> str:
    """One weight of one matrix set to `value` (NaN or +-Inf)."""
    from safetensors.torch import load_file, save_file

    _copy(src, dst)
    path = os.path.join(dst, WEIGHTS_FILE)
    state = load_file(path)
    name = next(k for k in sorted(state) if state[k].dim() == 2)
    tensor = state[name].clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    state[name] = tensor
    save_file(state, path)
    return dst


def for_another_target(target: str, dst: str, **changes: int) -> str:
    """A valid draft for a target whose config differs from `target`'s by `changes` (e.g.
    ``vocab_size=512``, ``hidden_size=512``, ``num_key_value_heads=4``)."""
    from ..testing.fixtures import make_tiny_draft

    with open(os.path.join(target, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    unknown = sorted(set(changes) - set(config))
    if unknown:
        raise ValueError(f"{unknown} are not fields of {target}'s config.json")
    config.update(changes)
    other = dst + ".target"
    os.makedirs(other, exist_ok=True)
    with open(os.path.join(other, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f)
    torch.manual_seed(0)
    return make_tiny_draft(dst, other)
