"""LongSpecDrafter: the draft layer beside a loaded target, and the drafting of a token tree.

Shared by both of vLLM's model runners: `proposer.LongSpecProposer` (the V1 runner's
``custom_class`` proposer, host-side bookkeeping per request id) and
`device_proposer.DeviceProposer` (vLLM's Model Runner V2, everything on the device).

Per drafting step, for a batch of requests:

1. ring update (`write_ring`): K/V of newly committed tokens go into the request's ring row,
   computed straight from token ids (no re-feed of accepted tokens through the whole layer, no
   draft prefill over the prompt beyond its last `window` tokens);
2. level 0: the last committed token queries its ring (self) and the target's last-layer cache
   over the committed prefix (cross); the top-w1 children are tree level 1;
3. level j: the nodes of level j query the ring + the K/V of their tree ancestors and
   themselves (scratch for this step only) and the same target prefix; the next level is the
   global top-w over (level j nodes x vocabulary) by cumulative log-probability (`beam_tree`).
   A chain is the tree of widths 1 (argmax at every level).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..compat import vllm_api
from ..compat.fused_ops import FusedOps
from ..config import LongSpecConfig
from ..draft.checkpoint import check_draft_fits_target, load_draft_checkpoint
from ..draft.model import DraftArchitecture
from ..draft.ring_cache import DraftKVRing
from ..draft.rope import rope_from_vllm_rotary
from ..draft.vocab import TOKEN_COUNTS_FILE, frequent_token_ids, load_token_counts
from vllm_longspec_kernels import attend_paged_prefix

from .beam_tree import enable_fused_topk, tree_node_offsets
from .draft_graphs import DraftInputs
from .draft_linear import DraftLinear, fp8_matmul_available
from .ring_attention import ring_attention
from .serving_layer import ServingDraftLayer
from .tp_draft import build_draft_on_rank
from .tree_tiles import tile_hint
from .vocab_head import DraftVocabHead, VocabShard

logger = logging.getLogger("vllm.longspec")


class LongSpecDrafter:
    """The draft layer, its logits head, its ring cache and the target's pieces it borrows.

    Args:
        vllm_config: the engine's ``VllmConfig``.
        config: the validated LongSpec options.
        ring_rows: rows of the draft's ring cache (one per request slot).
    """

    def __init__(self, vllm_config: Any, config: LongSpecConfig, ring_rows: int):
        self.vllm_config = vllm_config
        self.config = config
        self.widths = config.drafted_level_widths
        self.ring_rows = ring_rows
        self.draft: ServingDraftLayer | None = None
        self._target_attn = None

    def load(self, target_model: Any) -> None:
        """Builds the draft beside the target (memory allocated here is counted as model
        memory by vLLM's profiler, since both runners call this inside ``load_model``)."""
        self.target = vllm_api.target_handles(target_model)
        ckpt = load_draft_checkpoint(self.config.draft)
        check_draft_fits_target(
            ckpt.arch,
            DraftArchitecture.from_hf_config(vllm_api.target_hf_config(self.vllm_config)),
            self.config.draft)
        # Under tensor parallelism: this rank's shard of the draft and of the lm_head.
        on_rank = build_draft_on_rank(ckpt, target_model, self.target, self.vllm_config)
        self.on_rank = on_rank
        self.vocab_head = on_rank.head
        self.arch = ckpt.arch
        fp8 = self.config.draft_weight_dtype == "fp8"
        if fp8 and not fp8_matmul_available(self.target.device.index or 0):
            raise ValueError("LongSpec draft_weight_dtype='fp8' needs a CUDA GPU of compute "
                             "capability >= 8.9 and vLLM's FP8 kernels; use 'auto'")
        if self.config.draft_vocab_size is not None:
            self.vocab_head = self._pruned_vocab_head(target_model, on_rank.comm, fp8)
        ops = FusedOps.for_device(self.target.device)
        self.rope = ops.rope_fn(self.target.rotary) or rope_from_vllm_rotary(self.target.rotary)
        # What serving runs: the same weights, fused (see `serving_layer`); the reference
        # layer's unfused copies are dropped with it.
        self.draft = ServingDraftLayer(on_rank.draft, ops, fp8=fp8)
        self.ring = DraftKVRing(self.ring_rows, self.config.window, on_rank.num_kv_heads,
                                ckpt.arch.head_dim, self.target.dtype, self.target.device)
        if self.config.is_tree and self.target.device.type == "cuda":
            self._log_tile_hint()
            enable_fused_topk(tuple(self.widths), self.target.device)

    def _log_tile_hint(self) -> None:
        """Suggests a tree that fills FlashAttention-3's query tiles (`tree_tiles`). The draft's
        head counts and head dim are the target's (`check_draft_fits_target`)."""
        from vllm_longspec_kernels.prefix_split import fa3_two_warpgroup_rows

        hint = tile_hint(tuple(self.widths),
                         max(1, self.arch.num_attention_heads // self.arch.num_key_value_heads),
                         fa3_two_warpgroup_rows(self.arch.head_dim))
        if hint is not None:
            logger.info(hint)

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def num_nodes(self) -> int:
        """Tree nodes per request, the root included."""
        return 1 + sum(self.widths)

    def _pruned_vocab_head(self, target_model: Any, comm: Any,
                           fp8: bool = False) -> DraftVocabHead:
        """The draft's head over the most frequent `draft_vocab_size` tokens (a copy of those
        rows of the target's lm_head; see `draft.vocab`)."""
        if comm is not None:
            raise ValueError("LongSpec draft_vocab_size is not supported with tensor "
                             "parallelism yet; omit it")
        counts = load_token_counts(self.config.draft)
        if counts is None:
            raise ValueError(f"LongSpec draft_vocab_size needs the draft's token counts: "
                             f"{self.config.draft} has no {TOKEN_COUNTS_FILE}")
        size = int(self.config.draft_vocab_size)
        ids = frequent_token_ids(counts[:self.arch.vocab_size], size).to(self.target.device)
        rows = DraftLinear(vllm_api.lm_head_weight(target_model)[ids].detach().clone(),
                           fp8=fp8)
        return DraftVocabHead(rows, VocabShard(0, size, size), token_ids=ids)

    def target_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the target's last layer, [num_blocks, block_size, Hk, D] views."""
        if self._target_attn is None:
            self._target_attn = vllm_api.last_attention_layer(self.vllm_config)
        return vllm_api.paged_kv_views(self._target_attn.kv_cache, self.arch.head_dim,
                                       self._target_attn)

    @property
    def target_last_layer_name(self) -> str:
        if self._target_attn is None:
            self._target_attn = vllm_api.last_attention_layer(self.vllm_config)
        return self._target_attn.layer_name

    # ------------------------------------------------------------------ ring
    def write_ring(self, rows: torch.Tensor, positions: torch.Tensor,
                   token_ids: torch.Tensor) -> None:
        """Stores the self-attention K/V of committed tokens in their ring slots.

        Args:
            rows: [N] int64 ring row of each token.
            positions: [N] int64 absolute positions (within one row, at most `window` of them
                and no two sharing ``position % window``).
            token_ids: [N] int64 the tokens at those positions.
        """
        k, v = self.draft.self_kv(self.target.embed(token_ids), positions, self.rope)
        self.ring.write(rows, positions, k, v)

    # ------------------------------------------------------------------ drafting
    def draft_tree(self, inputs: DraftInputs, max_prefix: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafting of all levels on device tensors only (no host syncs: CUDA-graphable).

        Args:
            inputs: the batch's roots, ring rows, ring fill, positions, prefixes, block table,
                on the device (padded rows are harmless: they only read).
            max_prefix: an upper bound of ``inputs.prefix_lens`` (FlashAttention's
                ``max_seqlen_k``); 0 skips the cross-attention (nothing cached yet).
        Returns:
            tokens [B, N] int64 (BFS order, root excluded), parents [B, N+1] int64.
        """
        if all(width == 1 for width in self.widths):
            return self.draft_chain(inputs, max_prefix)
        return self._draft_levels(inputs, max_prefix)

    def _draft_levels(self, inputs: DraftInputs, max_prefix: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The general tree drafting (`draft_tree` without the chain shortcut)."""
        device = self.device
        scale = self.arch.head_dim ** -0.5
        batch_size = inputs.roots.shape[0]
        cu_of = _CuSeqlens(batch_size, device)
        cross_attend = self._cross_attention(inputs, max_prefix, cu_of)
        num_nodes = self.num_nodes
        # Converted once for all levels (each conversion is a kernel inside the graph).
        ring_rows = inputs.ring_rows.to(torch.int32)
        ring_valid = inputs.ring_valid.to(torch.int32)
        root_pos = inputs.root_positions
        parents = torch.full((batch_size, num_nodes), -1, dtype=torch.long, device=device)
        # ancestors[b, i, j]: node j is node i or one of its ancestors (column 0, the root, is
        # never read: the root is in the ring, not in the scratch).
        ancestors = torch.eye(num_nodes, dtype=torch.bool, device=device).repeat(
            batch_size, 1, 1)
        hk, d = self.ring.k.shape[2], self.ring.k.shape[3]
        # K/V of the tree nodes 1..N-1 of this step (the deepest level is never fed back).
        scratch_k = torch.empty(batch_size, num_nodes - 1, hk, d, dtype=self.ring.k.dtype,
                                device=device)
        scratch_v = torch.empty_like(scratch_k)
        query = inputs.roots.unsqueeze(1)  # [B, W] the level's tokens
        scores = torch.zeros(batch_size, 1, device=device)
        offsets = tree_node_offsets(self.widths)
        levels: list[torch.Tensor] = []
        for level, width in enumerate(self.widths):
            nodes_here = query.shape[1]
            first = 0 if level == 0 else offsets[level - 1]  # BFS id of the level's first node

            def self_attend(q, k, v, level=level, nodes_here=nodes_here, first=first):
                q = q.reshape(batch_size, nodes_here, *q.shape[1:])
                if level == 0:  # the root is committed: already in its ring
                    out = ring_attention(q, self.ring.k, self.ring.v, ring_rows, ring_valid,
                                         None, None, scale, cu_seqlens=cu_of(nodes_here))
                    return out.reshape(-1, *out.shape[2:])
                seen = first + nodes_here - 1  # scratch nodes 1..seen exist after this level
                scratch_k[:, first - 1:seen] = k.reshape(batch_size, nodes_here, hk, d)
                scratch_v[:, first - 1:seen] = v.reshape(batch_size, nodes_here, hk, d)
                # The level's nodes are one BFS range: their masks are a slice, not a gather.
                visible = ancestors[:, first:first + nodes_here, 1:seen + 1]
                out = ring_attention(q, self.ring.k, self.ring.v, ring_rows, ring_valid,
                                     scratch_k[:, :seen], scratch_v[:, :seen], scale, visible,
                                     cu_seqlens=cu_of(nodes_here))
                return out.reshape(-1, *out.shape[2:])

            # Materialised: vLLM's rotary kernel indexes positions as a dense array (an expand
            # of one request can reshape into a stride-0 view).
            positions = (root_pos + level).unsqueeze(1).expand(-1, nodes_here).contiguous()
            positions = positions.view(-1)
            hidden = self.draft(self.target.embed(query.reshape(-1)), positions, self.rope,
                                self_attend, lambda q, n=nodes_here: cross_attend(q, n))
            grown = self.vocab_head.expand_level(hidden, scores, width)
            new = slice(offsets[level], offsets[level] + width)
            parent_ids = grown.parent_local + first
            parents[:, new] = parent_ids
            # A new node sees what its parent sees, and itself (the identity it started with).
            ancestors[:, new] |= ancestors.gather(
                1, parent_ids.unsqueeze(-1).expand(-1, -1, num_nodes))
            levels.append(grown.tokens)
            query, scores = grown.tokens, grown.scores
        return torch.cat(levels, dim=1), parents

    def draft_chain(self, inputs: DraftInputs, max_prefix: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`draft_tree` for a chain (every width 1): the argmax at every level, without the
        tree's bookkeeping (parents, ancestor masks, cumulative scores, log-softmax)."""
        depth = len(self.widths)
        batch_size = inputs.roots.shape[0]
        scale = self.arch.head_dim ** -0.5
        cu_of = _CuSeqlens(batch_size, self.device)
        cross_attend = self._cross_attention(inputs, max_prefix, cu_of)
        # Converted once for all levels, as in `_draft_levels`.
        ring_rows = inputs.ring_rows.to(torch.int32)
        ring_valid = inputs.ring_valid.to(torch.int32)
        scratch: list[tuple[torch.Tensor, torch.Tensor]] = []
        query = inputs.roots
        levels = []
        for level in range(depth):

            def self_attend(q, k, v, level=level):
                if level > 0:  # a draft node: its own K/V join the scratch (it sees itself)
                    scratch.append((k, v))
                keys = torch.stack([kv[0] for kv in scratch], dim=1) if scratch else None
                values = torch.stack([kv[1] for kv in scratch], dim=1) if scratch else None
                out = ring_attention(q.unsqueeze(1), self.ring.k, self.ring.v, ring_rows,
                                     ring_valid, keys, values, scale, cu_seqlens=cu_of(1))
                return out.squeeze(1)

            hidden = self.draft(self.target.embed(query), inputs.root_positions + level,
                                self.rope, self_attend, lambda q: cross_attend(q, 1))
            query = self.vocab_head.greedy(hidden)
            levels.append(query)
        parents = torch.arange(-1, depth, device=self.device).unsqueeze(0).expand(batch_size, -1)
        return torch.stack(levels, dim=1), parents

    def _cross_attention(self, inputs: DraftInputs, max_prefix: int,
                         cu_of: "_CuSeqlens | None" = None):
        """cross_attend(q [B*n, Hq, D], n) over each request's committed target prefix:
        FlashAttention over the paged cache on the GPU, plain torch on the CPU."""
        k_cache, v_cache = self.target_kv()
        scale = self.arch.head_dim ** -0.5
        batch_size = inputs.roots.shape[0]
        backend = "auto" if self.device.type == "cuda" else "torch"
        cu_of = cu_of or _CuSeqlens(batch_size, self.device)

        def cross_attend(q: torch.Tensor, nodes_per_request: int) -> torch.Tensor:
            if max_prefix == 0:
                return torch.zeros_like(q)
            out, _ = attend_paged_prefix(q.contiguous(), k_cache, v_cache, inputs.block_table,
                                         inputs.prefix_lens, cu_of(nodes_per_request), scale,
                                         max_seqlen_q=nodes_per_request,
                                         max_prefix_len=max_prefix, backend=backend)
            return out.to(q.dtype)

        return cross_attend


class _CuSeqlens:
    """``arange(batch + 1) * n`` (int32) per query count n, built once per drafting call."""

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size, self.device = batch_size, device
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> torch.Tensor:
        cu = self._cache.get(n)
        if cu is None:
            cu = torch.arange(0, (self.batch_size + 1) * n, n, dtype=torch.int32,
                              device=self.device)
            self._cache[n] = cu
        return cu
