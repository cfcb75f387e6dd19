"""Tile steps shared by the Triton attention kernels (`prefix_attention`, `tree_attention`).

Triton inlines ``@triton.jit`` helpers into their callers: a kernel calling these compiles to
the same code as one with the lines written out (its PTX for sm_90 is byte-identical).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, IEEE_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation; IEEE_DOT: full fp32 precision (no TF32)."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def values_step(p, v, alpha, acc, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Online softmax's value update: ``acc * alpha + p @ v``.

    Args:
        p: [M, N] fp32 unnormalised probabilities, rounded to v's dtype first (as
            FlashAttention does).
        v: [N, D] the key tile's values.
        alpha: [M] fp32 rescaling of the running output for the new row maxima.
        acc: [M, D] fp32 running output.
        UPCAST_DOT: the interpreter's tl.dot mishandles bf16 operands: multiply in fp32.
    """
    p = p.to(v.dtype)
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return acc * alpha[:, None] + tile_dot(p, v, IEEE_DOT)
