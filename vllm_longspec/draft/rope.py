"""Rotary position embedding for the draft, always the target's own.

The draft's queries must be rotated exactly as the target rotated the keys it cached (the
cross-attention reads those keys post-RoPE), so the draft never builds RoPE from scratch:
in vLLM it calls the target's rotary module; in training it uses the target's Hugging Face
rotary module (`model.model.rotary_emb`). Both follow the same (neox / rotate-half) convention
with the same theta and scaling, so training and serving agree.
"""

from __future__ import annotations

from typing import Any

import torch

from .model import RopeFn


def rope_from_vllm_rotary(rotary: Any) -> RopeFn:
    """Adapter for a vLLM ``RotaryEmbedding`` (``forward(positions, query, key=None)``, which
    may rotate in place). Queries and keys share one rotation per position, so a key-only call
    passes the keys as queries."""

    def apply(positions: torch.Tensor, q: torch.Tensor | None,
              k: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if q is None and k is None:
            return None, None
        if q is None:
            k_rot, _ = rotary(positions, k.contiguous(), None)
            return None, k_rot
        q_rot, k_rot = rotary(positions, q.contiguous(), None if k is None else k.contiguous())
        return q_rot, k_rot

    return apply


def rope_from_cos_sin(cos_sin: Any, head_dim: int) -> RopeFn:
    """Adapter for a Hugging Face rotary module: ``cos_sin(x, position_ids) -> (cos, sin)``
    with cos/sin of shape [1, N, head_dim] (rotate-half convention)."""

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.view(n, -1, head_dim)
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        rotated = torch.cat((-x2, x1), dim=-1)
        out = x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]
        return out.to(x.dtype).reshape(n, -1)

    def apply(positions: torch.Tensor, q: torch.Tensor | None,
              k: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ref = q if q is not None else k
        if ref is None:
            return None, None
        cos, sin = cos_sin(ref, positions.view(1, -1))
        cos, sin = cos[0].float(), sin[0].float()
        return (None if q is None else rotate(q, cos, sin),
                None if k is None else rotate(k, cos, sin))

    return apply
