"""The LongSpec draft: one decoder layer that reads the target's last-layer KV cache.

    h   = embed(token)                                   (the target's embedding, shared)
    h  += o_proj(SelfAttn(RMSNorm_in(h)))                 sliding window over the draft's own K/V
    h  += cross.o_proj(CrossAttn(RMSNorm_psa(h)))        keys/values: the target's last layer
    h  += MLP(RMSNorm_pca(h))                             SwiGLU
    logits = target.lm_head(h)                           no final norm (as the published drafts)

The self-attention K/V of a token depend only on the token and its position (one layer, fed by
the embedding): that is why the draft's cache is a ring of ``window`` slots filled straight from
token ids, why its prefill touches only the last ``window`` prompt tokens, and why accepted
tokens are never re-fed.

How the two attentions find their keys differs between training (dense sequences) and serving
(ring buffer + paged target cache), so ``forward`` takes them as callables; everything else (the
weights, projections, norms, RoPE placement) is this one module, shared by both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# rope(positions [N], q [N, Hq*D] | None, k [N, Hk*D] | None) -> (q, k) rotated at `positions`
# (None stays None).
RopeFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                  tuple[torch.Tensor | None, torch.Tensor | None]]
# self_attend(q [N, Hq, D], k [N, Hk, D], v [N, Hk, D]) -> [N, Hq, D]; k/v are the queries' own.
SelfAttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# cross_attend(q [N, Hq, D]) -> [N, Hq, D] over the target's last-layer K/V.
CrossAttendFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DraftArchitecture:
    """Shapes of the draft layer; they are the target's (a draft for one target fits no other)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_hf_config(cls, config: Any) -> "DraftArchitecture":
        """From a Llama/Qwen2-style Hugging Face config (object or dict)."""
        get = (config.get if isinstance(config, Mapping)
               else lambda key, default=None: getattr(config, key, default))
        if get("text_config") is not None:  # multimodal wrappers keep the LM config inside
            return cls.from_hf_config(get("text_config"))
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        if hidden is None or heads is None:
            raise ValueError("config has no hidden_size / num_attention_heads: not a decoder LM")
        head_dim = get("head_dim") or hidden // heads
        return cls(hidden_size=int(hidden), num_attention_heads=int(heads),
                   num_key_value_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(head_dim), intermediate_size=int(get("intermediate_size")),
                   vocab_size=int(get("vocab_size")),
                   rms_norm_eps=float(get("rms_norm_eps") or 1e-6))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatches(self, target: "DraftArchitecture") -> list[str]:
        """Fields where this draft cannot run on `target` (empty when compatible)."""
        problems = []
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size"):
            mine, theirs = getattr(self, name), getattr(target, name)
            if mine != theirs:
                problems.append(f"{name}: draft {mine} vs target {theirs}")
        return problems


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class DraftSelfAttention(nn.Module):
    """q/k/v with bias, o without (the published layout, also for Llama targets)."""

    def __init__(self, arch: DraftArchitecture, with_kv: bool = True):
        super().__init__()
        q_size = arch.num_attention_heads * arch.head_dim
        kv_size = arch.num_key_value_heads * arch.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, q_size, bias=True)
        if with_kv:
            self.k_proj = nn.Linear(arch.hidden_size, kv_size, bias=True)
            self.v_proj = nn.Linear(arch.hidden_size, kv_size, bias=True)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=False)


class DraftMLP(nn.Module):
    def __init__(self, arch: DraftArchitecture):
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LongSpecDraftLayer(nn.Module):
    """The draft layer. Parameter names are the checkpoint's keys (published layout).

    The cross-attention has no k/v projections: its keys and values are the target's cached
    last-layer K/V, post-RoPE (the published checkpoints carry unused ``cross_attn.k_proj`` /
    ``v_proj`` tensors; the loader drops them).
    """

    def __init__(self, arch: DraftArchitecture):
        super().__init__()
        self.arch = arch
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = DraftSelfAttention(arch, with_kv=True)
        self.post_self_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.cross_attn = DraftSelfAttention(arch, with_kv=False)
        self.post_cross_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = DraftMLP(arch)
        self.scale = arch.head_dim ** -0.5

    # ---------------------------------------------------------------- pieces
    def self_kv(self, embeds: torch.Tensor, positions: torch.Tensor,
                rope: RopeFn) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention K/V of tokens: what the ring buffer stores.

        Args:
            embeds: [N, hidden] token embeddings.
            positions: [N] absolute positions.
        Returns:
            k, v: [N, Hk, D] each, k rotated at `positions`.
        """
        x = self.input_layernorm(embeds)
        k = self.self_attn.k_proj(x)
        v = self.self_attn.v_proj(x)
        _, k = rope(positions, None, k)
        hk, d = self.arch.num_key_value_heads, self.arch.head_dim
        return k.reshape(-1, hk, d), v.reshape(-1, hk, d)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, rope: RopeFn,
                self_attend: SelfAttendFn, cross_attend: CrossAttendFn) -> torch.Tensor:
        """One draft step for N query tokens.

        Args:
            embeds: [N, hidden] embeddings of the query tokens.
            positions: [N] their absolute positions (the target's RoPE at true positions).
            self_attend: attention of the rotated queries over the draft's own keys; receives
                the queries' own K/V too (a token always sees itself).
            cross_attend: attention of the rotated cross queries over the target's K/V.
        Returns:
            [N, hidden] final hidden states (feed to the target's lm_head as they are).
        """
        hq, hk, d = self.arch.num_attention_heads, self.arch.num_key_value_heads, self.arch.head_dim
        n = embeds.shape[0]
        h = embeds
        x = self.input_layernorm(h)
        q = self.self_attn.q_proj(x)
        k = self.self_attn.k_proj(x)
        v = self.self_attn.v_proj(x)
        q, k = rope(positions, q, k)
        attn = self_attend(q.reshape(n, hq, d), k.reshape(n, hk, d), v.reshape(n, hk, d))
        h = h + self.reduce_partial(self.self_attn.o_proj(attn.reshape(n, hq * d).to(h.dtype)))

        x = self.post_self_attention_layernorm(h)
        qc = self.cross_attn.q_proj(x)
        qc, _ = rope(positions, qc, None)
        attn = cross_attend(qc.reshape(n, hq, d))
        h = h + self.reduce_partial(self.cross_attn.o_proj(attn.reshape(n, hq * d).to(h.dtype)))

        h = h + self.reduce_partial(self.mlp(self.post_cross_attention_layernorm(h)))
        return h

    def reduce_partial(self, x: torch.Tensor) -> torch.Tensor:
        """Output of a row-parallel projection (o_proj, down_proj) before the residual add:
        complete here; a tensor-parallel shard sums the ranks' partial outputs
        (`draft.sharding.ShardedDraftLayer`)."""
        return x


def init_draft_weights(layer: LongSpecDraftLayer, seed: int = 0, std: float = 0.02,
                       zero_outputs: bool = False) -> LongSpecDraftLayer:
    """Random initialisation (norms at 1). `zero_outputs` zeroes o_proj/down_proj so that the
    layer adds nothing: the draft then predicts argmax lm_head(embed(token))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        if zero_outputs:
            layer.self_attn.o_proj.weight.zero_()
            layer.cross_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return layer
