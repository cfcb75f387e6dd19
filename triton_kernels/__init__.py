"""LongSpec attention kernels (installed as ``vllm_longspec_kernels``).

* ``tree_attention``  -- Triton tree-masked varlen attention (+ optional fused prefix merge).
* ``merge``           -- exact LSE merge of two partial attentions.
* ``kv_compaction``   -- one-launch, all-layer copy of accepted-path K/V inside paged caches.
* ``prefix_attention`` -- split-KV, GQA-packed paged prefix attention for few queries.
* ``prefix_split``    -- tree queries cut into sub-sequences that fit FA3's 64-row tile.
* ``hybrid``          -- prefix (FlashAttention / Triton split-KV / torch) + tree + merge.
* ``tree_bookkeeping`` -- one-launch recording and greedy acceptance of token trees (V2 runner).
* ``level_topk``      -- a beam-tree level's global top-k in two launches (bitonic, packed keys).

Every kernel has a pure-torch reference next to it (``*_ref``), or names it.
"""

from .level_topk import beam_topk, beam_topk_ref, beam_topk_supported
from .hybrid import (
    choose_prefix_backend,
    default_fa_version,
    flash_attn_available,
    hybrid_tree_attention,
    hybrid_tree_attention_ref,
    paged_prefix_attention_torch,
    attend_paged_prefix,
)
from .kv_compaction import (
    KVCacheTable,
    build_kv_cache_table,
    compact_kv_caches,
    compact_kv_caches_ref,
    split_kv_cache,
)
from .merge import merge_attn_states, merge_attn_states_ref
from .prefix_split import PrefixQuerySplit, fa_one_warpgroup_chunk, split_prefix_queries
from .prefix_attention import (
    PrefixAttnConfig,
    default_prefix_attn_config,
    fa_num_splits_heuristic,
    num_sms,
    paged_prefix_attention,
    prefix_attn_sweep_configs,
)
from .tree_bookkeeping import accept_greedy_trees, record_trees
from .tree_attention import (
    TreeAttnConfig,
    build_tree_mask,
    default_tree_attn_config,
    hopper_tree_attn_config,
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
    "PrefixAttnConfig",
    "PrefixQuerySplit",
    "TreeAttnConfig",
    "accept_greedy_trees",
    "attend_paged_prefix",
    "beam_topk",
    "beam_topk_ref",
    "beam_topk_supported",
    "build_kv_cache_table",
    "build_tree_mask",
    "choose_prefix_backend",
    "compact_kv_caches",
    "compact_kv_caches_ref",
    "default_fa_version",
    "default_prefix_attn_config",
    "default_tree_attn_config",
    "fa_num_splits_heuristic",
    "fa_one_warpgroup_chunk",
    "flash_attn_available",
    "hopper_tree_attn_config",
    "hybrid_tree_attention",
    "hybrid_tree_attention_ref",
    "is_triton_interpret",
    "merge_attn_states",
    "merge_attn_states_ref",
    "num_sms",
    "paged_prefix_attention",
    "paged_prefix_attention_torch",
    "prefix_attn_sweep_configs",
    "record_trees",
    "split_kv_cache",
    "split_prefix_queries",
    "tree_attention",
    "tree_attention_ref",
    "tree_attn_autotune_configs",
    "tree_mask_from_parents",
    "tree_mask_num_words",
    "unpack_tree_mask",
]
