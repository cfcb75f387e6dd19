"""Target attention for tree rows: hybrid attention (paged prefix + tree mask, merged by LSE).

Engines that verify token trees attend through LongSpec's tree attention backend
(``AttentionBackendEnum.CUSTOM``: `tree_backend_cuda` / `tree_backend_cpu`), the platform's
default backend whose impl mixes in `TreeVerifyingImpl`. Its forward is the default backend's
own -- which writes the step's K/V into the paged cache and is exact for every row that is not
a tree -- and, for the tree rows of the active `TreeVerificationPlan`, the output is

    softmax attention of node i over  [committed prefix 0..p)  U  {ancestors of i, i}

computed by ``vllm_longspec_kernels.hybrid_tree_attention``: FlashAttention over the paged prefix
(returning LSE) + the Triton tree-mask kernel, merged by LSE; plain torch on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..compat import vllm_api
from .verification import TreeVerificationPlan, active_plan


def _tree_mask(plan: TreeVerificationPlan) -> torch.Tensor:
    if plan.tree_mask is None:
        from vllm_longspec_kernels import tree_mask_from_parents, tree_mask_num_words

        plan.tree_mask = tree_mask_from_parents(
            plan.parents, plan.cu_seqlens, tree_mask_num_words(plan.max_nodes),
            max_seqlen=plan.max_nodes)
    return plan.tree_mask


def _rows_block_table(plan: TreeVerificationPlan, block_table: torch.Tensor) -> torch.Tensor:
    """The tree rows' block table, gathered once per step (every layer shares it)."""
    if plan.block_table is None:
        plan.block_table = block_table[plan.rows].to(torch.int32)
    return plan.block_table


def _kv_views(kv_cache: torch.Tensor, head_size: int, layer: Any
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views of a layer's paged cache, built once per cache tensor (kept on the layer,
    so they die with the engine)."""
    key = (kv_cache.data_ptr(), tuple(kv_cache.shape))
    cached = getattr(layer, "_longspec_kv_views", None)
    if cached is None or cached[0] != key:
        cached = (key, vllm_api.paged_kv_views(kv_cache, head_size, layer))
        layer._longspec_kv_views = cached
    return cached[1]


def tree_rows_attention(plan: TreeVerificationPlan, layer: Any, query: torch.Tensor,
                        key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        block_table: torch.Tensor,
                        num_heads: int, num_kv_heads: int, head_size: int,
                        scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output of the plan's tree tokens.

    Args:
        layer: the attention layer (owns the cache; its layout may depend on it on the CPU).
        query: [num_tokens, Hq(*D)] the step's queries; key/value: [num_tokens, Hk(*D)].
        kv_cache: the layer's paged cache (vLLM layout; the step's K/V already written).
        block_table: [num_reqs, max_blocks] the step's block table (kernel blocks).
        out: optional [T, Hq, D] buffer for the result (e.g. a slice of the layer's output).
    Returns:
        [T, Hq, D] (``out`` when given, else query's dtype), rows in ``plan.token_index`` order.
    """
    from vllm_longspec_kernels import hybrid_tree_attention

    rows = plan.token_slice if plan.token_slice is not None else plan.token_index
    q = query.view(query.shape[0], num_heads, head_size)[rows]
    k = key.view(key.shape[0], num_kv_heads, head_size)[rows]
    v = value.view(value.shape[0], num_kv_heads, head_size)[rows]
    k_cache, v_cache = _kv_views(kv_cache, head_size, layer)
    on_gpu = q.is_cuda
    return hybrid_tree_attention(
        q, k_cache, v_cache, _rows_block_table(plan, block_table), plan.prefix_lens, k, v,
        plan.cu_seqlens, _tree_mask(plan), scale, max_seqlen_q=plan.max_nodes,
        max_prefix_len=plan.max_prefix_len, out=out,
        prefix_backend="auto" if on_gpu else "torch",
        tree_backend="auto" if on_gpu else "torch")


@dataclass
class FullGraphTreeMasks:
    """The tree masks that full CUDA graphs of verification steps read.

    A full graph is captured for a *uniform* batch (every request verifies
    ``1 + num_draft_tokens`` tokens) and replayed without running Python, so its attention must
    take the trees from a persistent buffer: every row of such a batch is attended with
    hybrid attention under the mask found here at replay -- a tree row's ancestor mask, or
    the causal mask for a row verifying a chain (which is what the backend would have done).
    `TreeVerifier.after_prepare_inputs` fills it before every uniform step.

    Attributes:
        masks: [max_tokens, W] int32 packed ancestor bitmasks (``tree_attention``'s format).
        query_len: tokens per request of a uniform batch (1 + num_draft_tokens).
        max_model_len: the bound on prefixes (FlashAttention's ``max_seqlen_k`` in the graph).
    """

    masks: torch.Tensor
    query_len: int
    max_model_len: int


_FULL_GRAPH_MASKS: FullGraphTreeMasks | None = None


def set_full_graph_masks(masks: FullGraphTreeMasks | None) -> None:
    global _FULL_GRAPH_MASKS
    _FULL_GRAPH_MASKS = masks


def full_graph_masks() -> FullGraphTreeMasks | None:
    return _FULL_GRAPH_MASKS


def _uniform_batch(attn_metadata: Any, graphs: FullGraphTreeMasks | None) -> bool:
    """A batch vLLM may run as a full CUDA graph (every request `query_len` tokens)."""
    if graphs is None or getattr(attn_metadata, "seq_lens", None) is None:
        return False
    q = graphs.query_len
    total = int(attn_metadata.num_actual_tokens)
    return (int(getattr(attn_metadata, "max_query_len", 0)) == q and total % q == 0
            and total // q == attn_metadata.query_start_loc.shape[0] - 1)


def captured_tree_attention(graphs: FullGraphTreeMasks, layer: Any, query: torch.Tensor,
                            key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                            attn_metadata: Any, output: torch.Tensor, impl: Any) -> torch.Tensor:
    """Hybrid attention of a whole uniform batch, recorded into a full CUDA graph: everything
    it reads at replay is a persistent tensor (vLLM's query_start_loc / seq_lens / block
    table, this module's masks)."""
    from vllm_longspec_kernels import hybrid_tree_attention

    total = int(attn_metadata.num_actual_tokens)
    hq, hk, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    q = query.view(query.shape[0], hq, d)[:total]
    k = key.view(key.shape[0], hk, d)[:total]
    v = value.view(value.shape[0], hk, d)[:total]
    k_cache, v_cache = _kv_views(kv_cache, d, layer)
    prefix_lens = (attn_metadata.seq_lens - graphs.query_len).clamp_min(0).to(torch.int32)
    out_view = output.view(output.shape[0], hq, d)
    hybrid_tree_attention(
        q, k_cache, v_cache, attn_metadata.block_table, prefix_lens, k, v,
        attn_metadata.query_start_loc, graphs.masks[:total], impl.scale,
        max_seqlen_q=graphs.query_len, max_prefix_len=graphs.max_model_len,
        out=out_view[:total])
    return output


def tree_aware_forward(impl: Any, base_forward: Callable[..., torch.Tensor], layer: Any,
                       query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                       *args: Any, **kwargs: Any) -> torch.Tensor:
    """The backend's attention (``base_forward``) with the tree rows of the active plan
    attended by hybrid attention.

    A uniform batch without a plan (a full CUDA graph being captured or warmed up) is attended
    whole by `captured_tree_attention` (masks from `FullGraphTreeMasks`). Without a plan and
    without full-graph masks -- every step of an engine that drafts no trees, every prefill --
    this is exactly ``base_forward``.

    When every token of the step is a tree token the backend's own attention is skipped (the
    K/V were written by vLLM's separate cache-update op before this call); otherwise the
    backend attends every row and the tree rows are then overwritten."""
    plan = active_plan()
    graphs = full_graph_masks()
    # Uniform batches without a plan: a full-graph capture, its warm-up, or a step of chains
    # only; all take the masks from the persistent buffer (see FullGraphTreeMasks).
    if plan is None and attn_metadata is not None and _uniform_batch(attn_metadata, graphs):
        assert graphs is not None
        return captured_tree_attention(graphs, layer, query, key, value, kv_cache,
                                       attn_metadata, output, impl)
    if plan is None or attn_metadata is None:
        return base_forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            *args, **kwargs)
    # (Model Runner V2 pads some batches: its metadata may count padding tokens the plan,
    # which covers the real ones, leaves out.)
    if int(attn_metadata.num_actual_tokens) < plan.num_actual_tokens:
        raise RuntimeError(
            "LongSpec tree verification: the attention batch has "
            f"{attn_metadata.num_actual_tokens} tokens but the step's plan "
            f"{plan.num_actual_tokens}")
    out_view = output.view(output.shape[0], impl.num_heads, impl.head_size)
    if plan.covers_all_tokens and output.dtype == query.dtype:
        tree_rows_attention(plan, layer, query, key, value, kv_cache,
                            attn_metadata.block_table, impl.num_heads, impl.num_kv_heads,
                            impl.head_size, impl.scale,
                            out=out_view[:plan.num_actual_tokens])
        return output
    result = base_forward(layer, query, key, value, kv_cache, attn_metadata, output,
                          *args, **kwargs)
    tree_out = tree_rows_attention(
        plan, layer, query, key, value, kv_cache, attn_metadata.block_table, impl.num_heads,
        impl.num_kv_heads, impl.head_size, impl.scale)
    out_view[plan.token_index] = tree_out.to(output.dtype)
    return result


class TreeVerifyingImpl:
    """Mixin placed before a backend's ``AttentionImpl``: its ``forward`` is
    `tree_aware_forward` over the backend's own (see ``engine/tree_backend_*.py``)."""

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                output: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if output is None:
            raise ValueError("LongSpec tree attention writes into vLLM's output buffer")
        base_forward = super().forward  # type: ignore[misc]
        return tree_aware_forward(self, base_forward, layer, query, key, value, kv_cache,
                                  attn_metadata, output, *args, **kwargs)
