"""The draft layer's serving form: the same weights and math, far fewer kernels per call.

`draft.model.LongSpecDraftLayer` is the one definition of the draft (training and the
published checkpoint layout use it). Serving calls it once per tree level, and there its
structure -- separate q/k/v and gate/up projections, RMSNorms written as six elementwise ops,
SiLU and the product as two more -- turns into ~50 kernel launches per level whose launch
gaps, not their arithmetic, set the drafting time. `ServingDraftLayer` concatenates the q|k|v
and gate|up weights once at load time and runs the norms, residual adds and SwiGLU through
`compat.fused_ops` (vLLM's fused kernels on CUDA, identical torch elsewhere): ~13 launches
plus the two attentions. The output equals the reference layer's up to float rounding
(`tests/unit/test_serving_draft.py`); drafts are only proposals, so rounding never changes
what LongSpec generates.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat.fused_ops import FusedOps
from ..draft.model import CrossAttendFn, LongSpecDraftLayer, RopeFn, SelfAttendFn
from .draft_linear import DraftLinear


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ServingDraftLayer(nn.Module):
    """Inference-only view of a loaded `LongSpecDraftLayer` (its tensors are shared or
    concatenated copies; the original may be dropped).

    Args:
        layer: the loaded draft (a tensor-parallel shard keeps its ``reduce_partial``).
        ops: the fused kernels to run with.
        fp8: the per-level matmuls with FP8 weights (`draft_linear`; CUDA, Hopper/Ada).
    """

    def __init__(self, layer: LongSpecDraftLayer, ops: FusedOps, fp8: bool = False):
        super().__init__()
        self.arch = layer.arch
        self.ops = ops
        # A tensor-parallel shard sums the ranks' partial o_proj/down_proj outputs. (Not the
        # layer's bound method: that would keep the unfused copies of the weights alive.)
        comm = getattr(layer, "comm", None)
        self.reduce_partial = comm.all_reduce if comm is not None else _identity
        attn, cross, mlp = layer.self_attn, layer.cross_attn, layer.mlp
        self.q_size = self.arch.num_attention_heads * self.arch.head_dim
        self.kv_size = self.arch.num_key_value_heads * self.arch.head_dim
        with torch.no_grad():
            qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.qkv = DraftLinear(qkv_weight, qkv_bias, fp8)
        # The ring's K/V of committed tokens (`self_kv`, not per level) stay in the loaded
        # dtype: they are what every later query attends to.
        self.kv = DraftLinear(qkv_weight[self.q_size:].clone() if fp8 else
                              qkv_weight[self.q_size:], qkv_bias[self.q_size:])
        self.o = DraftLinear(attn.o_proj.weight, None, fp8)
        self.cross_q = DraftLinear(cross.q_proj.weight, cross.q_proj.bias, fp8)
        self.cross_o = DraftLinear(cross.o_proj.weight, None, fp8)
        self.gate_up = DraftLinear(gate_up, None, fp8)
        self.down = DraftLinear(mlp.down_proj.weight, None, fp8)
        self.norm_in = layer.input_layernorm.weight
        self.norm_self = layer.post_self_attention_layernorm.weight
        self.norm_cross = layer.post_cross_attention_layernorm.weight
        self.eps = layer.input_layernorm.eps

    def self_kv(self, embeds: torch.Tensor, positions: torch.Tensor,
                rope: RopeFn) -> tuple[torch.Tensor, torch.Tensor]:
        """`LongSpecDraftLayer.self_kv`: k, v [N, Hk, D] of tokens (k rotated)."""
        x = self.ops.rms_norm(embeds, self.norm_in, self.eps)
        kv = self.kv(x)
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        _, k = rope(positions, None, k)
        hk, d = self.arch.num_key_value_heads, self.arch.head_dim
        return k.reshape(-1, hk, d), v.reshape(-1, hk, d)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, rope: RopeFn,
                self_attend: SelfAttendFn, cross_attend: CrossAttendFn) -> torch.Tensor:
        """`LongSpecDraftLayer.forward` (same contract: [N, hidden] -> [N, hidden]), except
        that `embeds` may be overwritten (it is the residual stream)."""
        hq, hk, d = self.arch.num_attention_heads, self.arch.num_key_value_heads, self.arch.head_dim
        n = embeds.shape[0]
        x = self.ops.rms_norm(embeds, self.norm_in, self.eps)
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rope(positions, q, k)
        attn = self_attend(q.reshape(n, hq, d), k.reshape(n, hk, d), v.reshape(n, hk, d))
        out = self.reduce_partial(self.o(attn.reshape(n, hq * d).to(embeds.dtype)))
        x, h = self.ops.add_rms_norm(out, embeds, self.norm_self, self.eps)

        qc = self.cross_q(x)
        qc, _ = rope(positions, qc, None)
        attn = cross_attend(qc.reshape(n, hq, d))
        out = self.reduce_partial(self.cross_o(attn.reshape(n, hq * d).to(h.dtype)))
        x, h = self.ops.add_rms_norm(out, h, self.norm_cross, self.eps)

        mlp = self.down(self.ops.silu_and_mul(self.gate_up(x)))
        return h + self.reduce_partial(mlp)
