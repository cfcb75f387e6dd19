"""The frozen target: loads a Hugging Face causal LM and, per batch, returns what the draft
trains on -- the LAST decoder layer's K (post-RoPE) and V, and the final hidden states (the
lm_head input; target logits are formed from them chunk by chunk, never for a whole batch).

How K/V are captured: a forward pre-hook on the last layer's ``self_attn`` receives exactly the
inputs that layer attends with -- its normed hidden states and the ``(cos, sin)`` the model
computed for the given ``position_ids`` -- and recomputes ``k_proj`` / ``v_proj`` plus the
rotate-half RoPE in the model's dtype, the same ops as the layer itself (so the tensors match
bit for bit; tests/unit/test_train.py checks them against the layer's own output). Only the
public attributes ``model.model.layers[-1].self_attn.{k,v}_proj`` and ``model.model.rotary_emb``
are used, which Llama/Qwen2 keep across transformers versions.

Positions: the target is called with an explicit all-ones ``attention_mask``. Without one,
transformers (>= 4.5x) reads non-consecutive ``position_ids`` (anchor-offset jumps!) as several
packed sequences and would silently block attention across the jump.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..draft.model import DraftArchitecture, RopeFn
from ..draft.rope import rope_from_cos_sin
from .errors import TrainError

if TYPE_CHECKING:
    from .dist import DistInfo


class TargetError(TrainError):
    """The target folder cannot be used (missing, no config, unsupported model)."""


@dataclass
class TargetBatch:
    """The target's view of one batch (all without grad).

    k, v: [B, S, Hk, D] last-layer keys (post-RoPE) and values.
    hidden: [B, S, hidden] final hidden states (after the final norm): ``lm_head(hidden)`` are
        the target's logits.
    """

    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def read_target_config(path: str) -> dict[str, Any]:
    """The target's config.json as a dict, with clear errors for a bad folder."""
    if not os.path.isdir(path):
        raise TargetError(f"target {path!r} is not a folder (a local Hugging Face model folder "
                          "with config.json and weights is expected)")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise TargetError(f"target folder {path!r} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise TargetError(f"target config {config_path!r} is not valid JSON: {e}")


class FrozenTarget:
    """A frozen causal LM that exposes its last-layer K/V, final hidden states and lm_head.
    Call it like a module: ``target(input_ids, positions) -> TargetBatch``."""

    def __init__(self, model: nn.Module, config_dict: dict[str, Any] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config_dict = config_dict or model.config.to_dict()
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise TargetError(f"{type(model).__name__} is not a Llama/Qwen2-style decoder "
                              "(model.model.layers and model.model.rotary_emb are needed)")
        self.base = base
        self.attn = base.layers[-1].self_attn
        self.arch = DraftArchitecture.from_hf_config(model.config)
        config = model.config
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 32768)
        self.rotary = base.rotary_emb
        self.rope: RopeFn = rope_from_cos_sin(self.rotary, self.arch.head_dim)
        self._captured: dict[str, torch.Tensor] | None = None
        self.attn.register_forward_pre_hook(self._capture_kv, with_kwargs=True)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "FrozenTarget":
        """Loads a local Hugging Face folder (no hub access)."""
        from transformers import AutoModelForCausalLM

        config_dict = read_target_config(path)
        kwargs = dict(local_files_only=True)
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
            except TypeError:  # transformers < 4.56 calls it torch_dtype
                model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise TargetError(f"cannot load target {path!r}: {e}") from e
        return cls(model.to(device), config_dict)

    def shard_fsdp(self, info: "DistInfo") -> None:
        """Shards the decoder layers over the ranks (FSDP2), moving the rest to this rank's
        device whole (call on a target loaded on CPU)."""
        from .dist import shard_target_fsdp

        shard_target_fsdp(self.base, info)
        for name, module in self.model.named_children():
            if name != "model":
                module.to(info.device)  # lm_head
        for name, module in self.base.named_children():
            if name != "layers":
                module.to(info.device)  # embed_tokens, norm, rotary_emb

    # ------------------------------------------------------------------ pieces
    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, hidden] (the target's embedding, shared with the draft)."""
        with torch.no_grad():
            return self.embed_tokens(input_ids)

    def _capture_kv(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._captured is None:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None:  # older transformers: the attention computed RoPE itself
            cos_sin = self.rotary(hidden, self._captured["position_ids"])
        cos, sin = cos_sin
        head_dim = self.arch.head_dim
        shape = (*hidden.shape[:-1], -1, head_dim)
        k = module.k_proj(hidden).view(shape)
        v = module.v_proj(hidden).view(shape)
        if hasattr(module, "k_norm"):  # Qwen3-style per-head key norm (before RoPE)
            k = module.k_norm(k)
        # cos/sin are [B, S, D]: broadcast over the head axis of [B, S, Hk, D].
        k = (k * cos.unsqueeze(2)) + (_rotate_half(k) * sin.unsqueeze(2))
        self._captured["k"] = k
        self._captured["v"] = v

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> TargetBatch:
        """Runs the target over a batch.

        Args:
            input_ids: [B, S] token ids.
            positions: [B, S] position ids (anchor-offset or plain).
            inputs_embeds: [B, S, hidden] optional, ``embed(input_ids)`` if already computed.
        Returns:
            the last layer's K/V and the final hidden states (:class:`TargetBatch`).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        self._captured = {"position_ids": positions}
        try:
            out = self.base(inputs_embeds=inputs_embeds, position_ids=positions,
                            attention_mask=mask, use_cache=False)
            captured = self._captured
        finally:
            self._captured = None
        if "k" not in captured:
            raise TargetError("the target's last attention layer was not called: cannot capture "
                              "its K/V (unsupported model structure)")
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return TargetBatch(k=captured["k"], v=captured["v"], hidden=hidden)

    __call__ = forward
