"""The draft's matmuls at serving time: weights as loaded, or FP8 with per-channel scales.

A tree drafting step runs the one draft layer and the logits head once per level, each on a few
dozen tokens: memory-bound matmuls whose cost is the bytes of their weights (at Llama-3-8B shape
~0.5 GB of layer + 0.27 GB of a 32k-row head per level, bf16). FP8 (E4M3) weights with one scale
per output channel, and each token's activations quantised with its own scale (vLLM's
``scaled_fp8_quant`` + ``cutlass_scaled_mm``, Hopper/Ada), read half of that.

Drafts are proposals: the target verifies them as before, so what LongSpec generates is
unchanged; only how many drafts the target accepts can move (FP8 rounding of the draft's logits).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=None)
def fp8_matmul_available(device_index: int) -> bool:
    """vLLM's FP8 cutlass matmul runs on this CUDA device (compute capability >= 8.9)."""
    if not torch.cuda.is_available():
        return False
    try:
        from vllm import _custom_ops as ops
    except Exception:
        return False
    major, minor = torch.cuda.get_device_capability(device_index)
    try:
        return bool(ops.cutlass_scaled_mm_supports_fp8(major * 10 + minor))
    except Exception:
        return False


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], fp32 scales [N]) with ``weight ~= q * scale[:, None]``."""
    amax = weight.float().abs().amax(dim=1).clamp_min(1e-12)
    scale = amax / FP8_MAX
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    return quantized.to(torch.float8_e4m3fn), scale


class DraftLinear:
    """``y = x @ weight.T + bias`` for [M, K] activations.

    Args:
        weight: [N, K] (the loaded dtype).
        bias: [N] or None.
        fp8: store the weight as FP8 and multiply with vLLM's scaled matmul (CUDA only; the
            caller checks `fp8_matmul_available`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 fp8: bool = False):
        self.out_features, self.in_features = weight.shape
        self.fp8 = fp8
        self.bias = bias
        if not fp8:
            self.weight = weight
            return
        quantized, scale = quantize_fp8_per_channel(weight.detach())
        self.weight_t = quantized.t()  # [K, N] column-major, the layout cutlass reads
        self.weight_scale = scale.reshape(1, -1).contiguous()
        self.out_dtype = weight.dtype

    @property
    def nbytes(self) -> int:
        weight = self.weight_t if self.fp8 else self.weight
        return weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return F.linear(x, self.weight, self.bias)
        from vllm import _custom_ops as ops

        x_q, x_scale = ops.scaled_fp8_quant(x.contiguous(), use_per_token_if_dynamic=True)
        return ops.cutlass_scaled_mm(x_q, self.weight_t, x_scale, self.weight_scale,
                                     self.out_dtype, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the FP8 matmul computes, in plain torch (dequantised weight; unquantised
        activations): the check of the layout and scales."""
        if not self.fp8:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight_t.t().float() * self.weight_scale.reshape(-1, 1)
        out = x.float() @ weight.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)
