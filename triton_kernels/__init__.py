"""LongSpec attention kernels (installed as ``vllm_longspec_kernels``).

* ``tree_attention``  -- Triton tree-masked varlen attention (+ optional fused prefix merge).
* ``merge``           -- exact LSE merge of two partial attentions.
* ``kv_compaction``   -- one-launch, all-layer copy of accepted-path K/V inside paged caches.
* ``hybrid``          -- prefix (FlashAttention / torch) + tree + merge.

Every kernel has a pure-torch reference next to it (``*_ref``).
"""

from .hybrid import (
    default_fa_version,
    flash_attn_available,
    hybrid_tree_attention,
    hybrid_tree_attention_ref,
    paged_prefix_attention_torch,
)
from .kv_compaction import (
    KVCacheTable,
    build_kv_cache_table,
    compact_kv_caches,
    compact_kv_caches_ref,
    split_kv_cache,
)
from .merge import merge_attn_states, merge_attn_states_ref
from .tree_attention import (
    TreeAttnConfig,
    build_tree_mask,
    default_tree_attn_config,
    is_triton_interpret,
    tree_attention,
    tree_attention_ref,
    tree_attn_autotune_configs,
    tree_mask_from_parents,
    tree_mask_num_words,
    unpack_tree_mask,
)

__all__ = [
    "KVCacheTable",
    "TreeAttnConfig",
    "build_kv_cache_table",
    "build_tree_mask",
    "compact_kv_caches",
    "compact_kv_caches_ref",
    "default_fa_version",
    "default_tree_attn_config",
    "flash_attn_available",
    "hybrid_tree_attention",
    "hybrid_tree_attention_ref",
    "is_triton_interpret",
    "merge_attn_states",
    "merge_attn_states_ref",
    "paged_prefix_attention_torch",
    "split_kv_cache",
    "tree_attention",
    "tree_attention_ref",
    "tree_attn_autotune_configs",
    "tree_mask_from_parents",
    "tree_mask_num_words",
    "unpack_tree_mask",
]
