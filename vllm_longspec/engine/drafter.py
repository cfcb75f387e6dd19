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

from .beam_tree import tree_node_offsets
from .draft_graphs import DraftInputs
from .ring_attention import ring_attention
from .serving_layer import ServingDraftLayer
from .tp_draft import build_draft_on_rank
from .vocab_head import DraftVocabHead, VocabShard

logger = logging.getLogger("vllm_longspec")


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
        if self.config.draft_vocab_size is not None:
            self.vocab_head = self._pruned_vocab_head(target_model, on_rank.comm)
        ops = FusedOps.for_device(self.target.device)
        self.rope = ops.rope_fn(self.target.rotary) or rope_from_vllm_rotary(self.target.rotary)
        # What serving runs: the same weights, fused (see `serving_layer`); the reference
        # layer's unfused copies are dropped with it.
        self.draft = ServingDraftLayer(on_rank.draft, ops)
        self.ring = DraftKVRing(self.ring_rows, self.config.window, on_rank.num_kv_heads,
                                ckpt.arch.head_dim, self.target.dtype, self.target.device)

    @property
    def device(self) -> torch.device:
        return self.target.device

    @property
    def num_nodes(self) -> int:
        """Tree nodes per request, the root included."""
        return 1 + sum(self.widths)

    def _pruned_vocab_head(self, target_model: Any, comm: Any) -> DraftVocabHead:
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
        rows = vllm_api.lm_head_weight(target_model)[ids].detach().clone()
        return DraftVocabHead(lambda hidden: torch.nn.functional.linear(hidden, rows),
                              VocabShard(0, size, size), token_ids=ids)

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
        cross_attend = self._cross_attention(inputs, max_prefix)
        num_nodes = self.num_nodes
        ring_rows, ring_valid, root_pos = inputs.ring_rows, inputs.ring_valid, inputs.root_positions
        parents = torch.full((batch_size, num_nodes), -1, dtype=torch.long, device=device)
        # ancestors[b, i, j]: node j (>= 1) is node i or one of its ancestors.
        ancestors = torch.zeros(batch_size, num_nodes, num_nodes, dtype=torch.bool,
                                device=device)
        scratch_k: torch.Tensor | None = None  # [B, S, Hk, D], tree nodes 1..S
        scratch_v: torch.Tensor | None = None
        query = inputs.roots.unsqueeze(1)  # [B, W] the level's tokens
        scores = torch.zeros(batch_size, 1, device=device)
        level_nodes = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # BFS ids
        offsets = tree_node_offsets(self.widths)
        levels: list[torch.Tensor] = []
        for level, width in enumerate(self.widths):
            nodes_here = query.shape[1]

            def self_attend(q, k, v, level=level, nodes_here=nodes_here,
                            level_nodes=level_nodes):
                nonlocal scratch_k, scratch_v
                q = q.reshape(batch_size, nodes_here, *q.shape[1:])
                if level == 0:  # the root is committed: already in its ring
                    out = ring_attention(q, self.ring.k, self.ring.v, ring_rows, ring_valid,
                                         None, None, scale)
                    return out.reshape(-1, *out.shape[2:])
                k = k.reshape(batch_size, nodes_here, *k.shape[1:])
                v = v.reshape(batch_size, nodes_here, *v.shape[1:])
                scratch_k = k if scratch_k is None else torch.cat([scratch_k, k], dim=1)
                scratch_v = v if scratch_v is None else torch.cat([scratch_v, v], dim=1)
                seen = scratch_k.shape[1]
                visible = ancestors.gather(
                    1, level_nodes.unsqueeze(-1).expand(-1, -1, num_nodes))[:, :, 1:seen + 1]
                out = ring_attention(q, self.ring.k, self.ring.v, ring_rows, ring_valid,
                                     scratch_k, scratch_v, scale, visible)
                return out.reshape(-1, *out.shape[2:])

            positions = (root_pos + level).repeat_interleave(nodes_here)
            hidden = self.draft(self.target.embed(query.reshape(-1)), positions, self.rope,
                                self_attend, lambda q, n=nodes_here: cross_attend(q, n))
            grown = self.vocab_head.expand_level(hidden, scores, width)
            new_nodes = torch.arange(offsets[level], offsets[level] + width, device=device)
            new_nodes = new_nodes.unsqueeze(0).expand(batch_size, -1)
            parent_ids = level_nodes.gather(1, grown.parent_local)
            parents[:, offsets[level]:offsets[level] + width] = parent_ids
            inherited = ancestors.gather(1, parent_ids.unsqueeze(-1).expand(-1, -1, num_nodes))
            # Each new node is its own "ancestor" (it sees itself).
            inherited = inherited.scatter(2, new_nodes.unsqueeze(-1), True)
            ancestors[:, offsets[level]:offsets[level] + width] = inherited
            levels.append(grown.tokens)
            query, scores, level_nodes = grown.tokens, grown.scores, new_nodes
        return torch.cat(levels, dim=1), parents

    def draft_chain(self, inputs: DraftInputs, max_prefix: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`draft_tree` for a chain (every width 1): the argmax at every level, without the
        tree's bookkeeping (parents, ancestor masks, cumulative scores, log-softmax)."""
        depth = len(self.widths)
        batch_size = inputs.roots.shape[0]
        scale = self.arch.head_dim ** -0.5
        cross_attend = self._cross_attention(inputs, max_prefix)
        scratch: list[tuple[torch.Tensor, torch.Tensor]] = []
        query = inputs.roots
        levels = []
        for level in range(depth):

            def self_attend(q, k, v, level=level):
                if level > 0:  # a draft node: its own K/V join the scratch (it sees itself)
                    scratch.append((k, v))
                keys = torch.stack([kv[0] for kv in scratch], dim=1) if scratch else None
                values = torch.stack([kv[1] for kv in scratch], dim=1) if scratch else None
                out = ring_attention(q.unsqueeze(1), self.ring.k, self.ring.v,
                                     inputs.ring_rows, inputs.ring_valid, keys, values, scale)
                return out.squeeze(1)

            hidden = self.draft(self.target.embed(query), inputs.root_positions + level,
                                self.rope, self_attend, lambda q: cross_attend(q, 1))
            query = self.vocab_head.greedy(hidden)
            levels.append(query)
        parents = torch.arange(-1, depth, device=self.device).unsqueeze(0).expand(batch_size, -1)
        return torch.stack(levels, dim=1), parents

    def _cross_attention(self, inputs: DraftInputs, max_prefix: int):
        """cross_attend(q [B*n, Hq, D], n) over each request's committed target prefix:
        FlashAttention over the paged cache on the GPU, plain torch on the CPU."""
        k_cache, v_cache = self.target_kv()
        scale = self.arch.head_dim ** -0.5
        batch_size = inputs.roots.shape[0]
        backend = "auto" if self.device.type == "cuda" else "torch"

        def cross_attend(q: torch.Tensor, nodes_per_request: int) -> torch.Tensor:
            if max_prefix == 0:
                return torch.zeros_like(q)
            cu = torch.arange(batch_size + 1, dtype=torch.int32,
                              device=q.device) * nodes_per_request
            out, _ = attend_paged_prefix(q.contiguous(), k_cache, v_cache, inputs.block_table,
                                         inputs.prefix_lens, cu, scale,
                                         max_seqlen_q=nodes_per_request,
                                         max_prefix_len=max_prefix, backend=backend)
            return out.to(q.dtype)

        return cross_attend
