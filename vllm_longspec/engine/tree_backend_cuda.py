"""LongSpec's tree attention backend on CUDA: vLLM's FlashAttention backend, tree-aware.

Registered as ``AttentionBackendEnum.CUSTOM`` (`compat.attention_backend`) and selected for
engines that verify token trees. Metadata, KV layout, cache writes and CUDA-graph support are
FlashAttention's; ``forward`` is `verify_attention.tree_aware_forward`, which is FlashAttention's
own forward for every step without a tree (prefills, plain decodes, chains) and hybrid tree
attention (paged FlashAttention prefix + Triton tree kernel, merged by LSE) for tree rows.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from .verify_attention import TreeVerifyingImpl


class LongSpecTreeFlashAttentionImpl(TreeVerifyingImpl, FlashAttentionImpl):
    pass


class LongSpecTreeFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LongSpecTreeFlashAttentionImpl]:
        return LongSpecTreeFlashAttentionImpl
