"""Reading and writing LongSpec draft checkpoints.

Layouts read:
  * the published one (``sail/longspec-*``): a folder with ``config.json`` (the target's
    Llama/Qwen2 config fields) and ``model.safetensors`` (fp32 weights of the draft layer);
  * the reference trainer's ``draft_model_weights.pth`` (a state dict), given as the file or as a
    folder holding it, with a ``config.json`` beside it.
Written: the published layout, plus a ``longspec`` section in ``config.json`` (window, target).

Keys are normalised: wrapper prefixes are stripped, the never-used ``cross_attn.k_proj`` /
``cross_attn.v_proj`` and any copy of the target's embedding / lm_head are dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import DraftArchitecture, LongSpecDraftLayer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_WEIGHTS_FILE = "draft_model_weights.pth"
# Wrapper prefixes seen in checkpoints (DDP, the reference trainer, HF wrappers).
_PREFIXES = ("module.", "draft_model.", "model.", "glide.", "draft.", "layer.", "layers.0.")
_LAYER_MODULES = ("input_layernorm.", "self_attn.", "post_self_attention_layernorm.",
                  "cross_attn.", "post_cross_attention_layernorm.", "mlp.")
# Present in published/reference checkpoints but never used by the draft.
_UNUSED = ("cross_attn.k_proj.", "cross_attn.v_proj.")
_SHARED_WITH_TARGET = ("embed_tokens", "lm_head", "rotary_emb")


class DraftCheckpointError(ValueError):
    """The draft checkpoint is missing, corrupt, or does not fit the target."""


@dataclass
class DraftCheckpoint:
    arch: DraftArchitecture
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def window(self) -> int | None:
        return self.config.get("longspec", {}).get("window")


def _find_files(path: str) -> tuple[str, str]:
    """Returns (config.json path, weights path) for a folder or a weights file."""
    if not os.path.exists(path):
        raise DraftCheckpointError(f"LongSpec draft not found: {path!r} does not exist")
    if os.path.isdir(path):
        config = os.path.join(path, CONFIG_FILE)
        for name in (WEIGHTS_FILE, REFERENCE_WEIGHTS_FILE):
            weights = os.path.join(path, name)
            if os.path.exists(weights):
                break
        else:
            raise DraftCheckpointError(
                f"LongSpec draft folder {path!r} has neither {WEIGHTS_FILE} nor "
                f"{REFERENCE_WEIGHTS_FILE}")
    else:
        weights = path
        config = os.path.join(os.path.dirname(path), CONFIG_FILE)
    if not os.path.exists(config):
        raise DraftCheckpointError(f"LongSpec draft {path!r} has no {CONFIG_FILE} beside its weights")
    return config, weights


def is_draft_folder(path: str) -> bool:
    """Whether `path` looks like a LongSpec draft (so `--speculative-model PATH` means LongSpec)."""
    try:
        config_path, _ = _find_files(path)
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (DraftCheckpointError, OSError, ValueError):
        return False
    archs = " ".join(config.get("architectures") or [])
    return "longspec" in config or "Glide" in archs or "LongSpec" in archs


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips wrapper prefixes; drops unused and target-shared tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while not name.startswith(_LAYER_MODULES):
            prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
            if prefix is None:
                break
            name = name[len(prefix):]
        if name.startswith(_UNUSED) or any(s in name for s in _SHARED_WITH_TARGET):
            continue
        out[name] = tensor
    return out


def load_draft_checkpoint(path: str) -> DraftCheckpoint:
    """Reads a draft checkpoint (any supported layout) without building the module."""
    config_path, weights_path = _find_files(path)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise DraftCheckpointError(f"LongSpec draft config {config_path!r} is not valid JSON: {e}")
    try:
        arch = DraftArchitecture.from_hf_config(config)
    except (TypeError, ValueError) as e:
        raise DraftCheckpointError(f"LongSpec draft config {config_path!r} is incomplete: {e}")
    try:
        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except Exception as e:  # corrupt or truncated files raise many different types
        raise DraftCheckpointError(
            f"cannot read LongSpec draft weights {weights_path!r} (truncated or corrupt?): {e}")
    if not isinstance(state, dict):
        raise DraftCheckpointError(f"{weights_path!r} does not hold a state dict")
    return DraftCheckpoint(arch=arch, state_dict=normalise_keys(state), config=config,
                           path=os.path.abspath(path))


def build_draft_layer(ckpt: DraftCheckpoint, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> LongSpecDraftLayer:
    """Builds the draft layer from a checkpoint, checking every tensor's name, shape and values."""
    layer = LongSpecDraftLayer(ckpt.arch)
    check_state_dict(ckpt, {k: tuple(t.shape) for k, t in layer.state_dict().items()})
    layer.load_state_dict(ckpt.state_dict)
    return layer.to(device=device, dtype=dtype).eval()


def check_state_dict(ckpt: DraftCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Raises `DraftCheckpointError` unless the checkpoint holds exactly the `expected` tensor
    names with those shapes, all finite."""
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if missing or unexpected:
        raise DraftCheckpointError(
            f"LongSpec draft {ckpt.path!r} does not match the draft layout: missing {missing}, "
            f"unexpected {unexpected}")
    for name, tensor in ckpt.state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise DraftCheckpointError(
                f"LongSpec draft tensor {name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name])} from its config.json")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DraftCheckpointError(f"LongSpec draft tensor {name} contains NaN or Inf")


def check_draft_fits_target(draft: DraftArchitecture, target: DraftArchitecture,
                            draft_path: str = "") -> None:
    problems = draft.mismatches(target)
    if problems:
        raise DraftCheckpointError(
            f"LongSpec draft {draft_path!r} was made for another target: " + "; ".join(problems))


def save_draft_checkpoint(layer: LongSpecDraftLayer, folder: str, *, window: int,
                          target_config: dict[str, Any] | None = None,
                          dtype: torch.dtype = torch.float32,
                          extra: dict[str, Any] | None = None) -> str:
    """Writes `layer` in the published layout (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config: dict[str, Any] = {}
    if target_config:
        keep = ("model_type", "hidden_act", "max_position_embeddings", "rope_theta",
                "rope_scaling", "rope_parameters", "tie_word_embeddings", "torch_dtype",
                "dtype")
        config.update({k: target_config[k] for k in keep if k in target_config})
    config.update(layer.arch.to_dict())
    config["architectures"] = ["LongSpecDraftLayer"]
    config["longspec"] = {"window": window, **(extra or {})}
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in layer.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE))
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return folder


@dataclass
class DraftHeader:
    """What a checkpoint promises, read without loading its tensors."""

    arch: DraftArchitecture
    window: int | None
    path: str


def expected_shapes(arch: DraftArchitecture) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        layer = LongSpecDraftLayer(arch)
    return {name: tuple(t.shape) for name, t in layer.state_dict().items()}


def load_draft_header(path: str) -> DraftHeader:
    """Reads config.json and the safetensors header (names and shapes, no data): catches a
    missing, truncated or mismatched checkpoint before any engine starts."""
    config_path, weights_path = _find_files(path)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        arch = DraftArchitecture.from_hf_config(config)
    except (ValueError, TypeError) as e:
        raise DraftCheckpointError(f"LongSpec draft config {config_path!r} is invalid: {e}")
    if weights_path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(weights_path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise DraftCheckpointError(
                f"cannot read LongSpec draft weights {weights_path!r} (truncated or corrupt?): {e}")
        shapes = {name: shape for key, shape in shapes.items()
                  for name in normalise_keys({key: None})}
        expected = expected_shapes(arch)
        missing = sorted(set(expected) - set(shapes))
        wrong = sorted(k for k in expected if k in shapes and shapes[k] != expected[k])
        if missing or wrong:
            raise DraftCheckpointError(
                f"LongSpec draft {path!r} does not match its config.json: missing {missing}, "
                f"wrong shapes {[(k, shapes[k], expected[k]) for k in wrong]}")
    elif os.path.getsize(weights_path) == 0:
        raise DraftCheckpointError(f"LongSpec draft weights {weights_path!r} are empty")
    return DraftHeader(arch=arch, window=config.get("longspec", {}).get("window"),
                       path=os.path.abspath(path))


def check_draft_weights(path: str) -> None:
    """Reads every tensor of a draft checkpoint once and refuses NaN or Inf values, naming the
    tensor. Run before the engine starts (one tensor in memory at a time for safetensors), so a
    broken draft stops ``vllm serve`` at once instead of inside a worker a minute later;
    `build_draft_layer` checks again when the worker loads the draft.

    Runs on one CPU thread: it runs in vLLM's API process, which then *forks* the engine core,
    and a fork after torch's intra-op (OpenMP) thread team has started leaves the child's first
    parallel CPU op waiting forever (seen on vLLM 0.26: the V2 runner's first pinned-buffer
    fill hung the engine core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_draft_weights(path)
    finally:
        torch.set_num_threads(threads)


def _check_draft_weights(path: str) -> None:
    _, weights_path = _find_files(path)
    try:
        if weights_path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(weights_path, framework="pt") as f:
                for key in f.keys():
                    _check_finite(key, f.get_tensor(key))
            return
        state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
    except DraftCheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files raise many different types
        raise DraftCheckpointError(
            f"cannot read LongSpec draft weights {weights_path!r} (truncated or corrupt?): {e}")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DraftCheckpointError(f"{weights_path!r} does not hold a state dict")
    for key, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            _check_finite(key, tensor)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise DraftCheckpointError(
            f"LongSpec draft tensor {name} contains NaN or Inf ({bad} of {tensor.numel()} "
            "values): the checkpoint is broken")
