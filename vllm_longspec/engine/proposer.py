"""LongSpecProposer: drafts a chain of tokens per request inside vLLM's V1 model runner.

vLLM loads it as a ``custom_class`` proposer (see `spec_config`); the runner hook in
`compat.patches` hands it, each step, what the custom-class interface leaves out (request ids,
prompt lengths, the block table, finished requests). Per step, for every request that just
produced a token:

1. ring update: K/V of the newly committed tokens (at most `window`) go into the request's ring
   row, computed straight from token ids (no re-feed of accepted tokens, no draft prefill over
   the prompt);
2. level 0: the last committed token queries its ring (self) and the target's last-layer cache
   over the committed prefix (cross); the argmax is draft token 1;
3. level j: the nodes of tree level j query the ring + the K/V of their tree ancestors and
   themselves (scratch for this step only) and the same target prefix; the next level is the
   global top-w over (level j nodes x vocabulary) by cumulative log-probability (`beam_tree`);
   and so on for `num_speculative_tokens` levels. A chain is the tree of widths 1 (argmax).

A chain is handed to vLLM as is: its rejection sampler verifies point-mass drafts losslessly for
greedy and sampled requests alike (draft_probs=None). A tree is handed over BFS-flattened and
verified by `tree_step` (depth positions, hybrid tree attention, lossless tree acceptance);
requests whose sampling a tree cannot honour (penalties, logprobs, ...) get the tree's best path
as a chain instead.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from ..compat import vllm_api
from ..config import LongSpecConfig
from ..draft.checkpoint import check_draft_fits_target, load_draft_checkpoint
from ..draft.model import DraftArchitecture, LongSpecDraftLayer
from ..draft.ring_cache import DraftKVRing
from ..draft.vocab import TOKEN_COUNTS_FILE, frequent_token_ids, load_token_counts
from ..draft.rope import rope_from_vllm_rotary
from vllm_longspec_kernels import attend_paged_prefix

from ..health.guard import drafting_guard
from .beam_tree import best_path, tree_node_offsets
from .draft_attention import grouped_ring_self_attention
from .draft_graphs import DraftCudaGraphs, DraftInputs, draft_graphs_enabled
from .tp_draft import build_draft_on_rank
from .tree_step import DraftedTree, TreeVerifier
from .vocab_head import DraftVocabHead, VocabShard

logger = logging.getLogger("vllm_longspec")


class LongSpecProposer:
    """The ``custom_class`` proposer. Constructed by vLLM with the ``VllmConfig`` only."""

    is_longspec_proposer = True

    def __init__(self, vllm_config: Any):
        from ..compat.patches import apply_runner_patches

        apply_runner_patches()
        self.vllm_config = vllm_config
        options = (vllm_config.additional_config or {}).get("longspec")
        if options is None:
            raise ValueError("LongSpecProposer needs additional_config['longspec']; use "
                             "speculative_config={'method': 'longspec', ...}")
        self.config = LongSpecConfig.from_dict(options)
        self.tree_verifier = TreeVerifier(vllm_config) if self.config.is_tree else None
        self.max_model_len = vllm_config.model_config.max_model_len
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.depth = self.config.num_speculative_tokens
        self.widths = self.config.level_widths
        self._step: vllm_api.RunnerStep | None = None
        self.draft: LongSpecDraftLayer | None = None
        self.draft_graphs: DraftCudaGraphs | None = None
        self.stats = {"steps": 0, "drafted_requests": 0, "skipped_short_prompt": 0,
                      "chain_fallback_sampling": 0, "draft_seconds": 0.0,
                      "skipped_max_model_len": 0}
        # benchmarks/bench_step_cost.py: device-synchronised wall time of every drafting step
        self._time_drafting = os.environ.get("LONGSPEC_TIME_DRAFTING") == "1"

    # ------------------------------------------------------------------ setup
    def load_model(self, target_model: Any) -> None:
        """Builds the draft beside the target (called by the runner after the target loads;
        memory allocated here is counted as model memory by vLLM's profiler)."""
        self.target = vllm_api.target_handles(target_model)
        ckpt = load_draft_checkpoint(self.config.draft)
        check_draft_fits_target(
            ckpt.arch,
            DraftArchitecture.from_hf_config(vllm_api.target_hf_config(self.vllm_config)),
            self.config.draft)
        # Under tensor parallelism: this rank's shard of the draft and of the lm_head.
        on_rank = build_draft_on_rank(ckpt, target_model, self.target, self.vllm_config)
        self.draft, self.vocab_head = on_rank.draft, on_rank.head
        self.arch = ckpt.arch
        if self.config.draft_vocab_size is not None:
            self.vocab_head = self._pruned_vocab_head(target_model, on_rank.comm)
        self.rope = rope_from_vllm_rotary(self.target.rotary)
        self.ring = DraftKVRing(self.max_num_reqs, self.config.window,
                                on_rank.num_kv_heads, ckpt.arch.head_dim,
                                self.target.dtype, self.target.device)
        self._target_attn = None
        if draft_graphs_enabled(self.target.device, self.vllm_config.model_config.enforce_eager,
                                on_rank.comm is not None):
            self.draft_graphs = DraftCudaGraphs(self._draft_tree_tensors, self.max_model_len,
                                                self.target.device)
        if self.tree_verifier is not None:
            vllm_api.check_tree_cudagraphs(self.vllm_config)
            self.tree_verifier.install()
            self.tree_verifier.comm = on_rank.comm
        shape = (f"tree {list(self.widths)}" if self.tree_verifier is not None
                 else f"chain of {self.depth}")
        logger.info("LongSpec draft %s loaded: window %d, %s, ring %.1f KiB/request "
                    "(TP rank %d of %d)", self.config.draft, self.config.window, shape,
                    self.ring.nbytes_per_request / 1024, on_rank.rank, on_rank.world_size)

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

    def begin_step(self, step: vllm_api.RunnerStep) -> None:
        """Called by the runner hook right before `propose`."""
        self._step = step
        if step.finished_req_ids:
            self.ring.release(step.finished_req_ids)
            if self.tree_verifier is not None:
                self.tree_verifier.forget(step.finished_req_ids)

    def _target_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._target_attn is None:
            self._target_attn = vllm_api.last_attention_layer(self.vllm_config)
        return vllm_api.paged_kv_views(self._target_attn.kv_cache, self.arch.head_dim,
                                       self._target_attn)

    # ------------------------------------------------------------------ drafting
    @drafting_guard  # a drafting error decodes the step without drafts; stats go to /metrics
    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        if not self._time_drafting:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        self._synchronize()
        start = time.perf_counter()
        drafts = self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        self._synchronize()
        self.stats["draft_seconds"] += time.perf_counter() - start
        return drafts

    def _synchronize(self) -> None:
        if self.target.device.type == "cuda":
            torch.cuda.synchronize(self.target.device)

    def _propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                 token_ids_cpu: np.ndarray) -> list[list[int]]:
        step = self._step
        if step is None:
            raise RuntimeError("LongSpec: the runner hook did not run (plugin not registered?)")
        self._step = None
        self.stats["steps"] += 1
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        batch: list[int] = []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:
                continue  # partial prefill or discarded: nothing new to speculate from
            if int(step.num_prompt_tokens[i]) < self.config.min_prompt_len:
                self.stats["skipped_short_prompt"] += 1
                continue
            if int(num_tokens_no_spec[i]) + 1 >= self.max_model_len:
                self.stats["skipped_max_model_len"] += 1
                continue
            batch.append(i)
        if self.tree_verifier is not None:
            self.tree_verifier.forget(step.req_ids[i] for i in range(len(sampled_token_ids)))
        if not batch:
            return drafts
        self.stats["drafted_requests"] += len(batch)
        req_ids = [step.req_ids[i] for i in batch]
        lengths = [int(num_tokens_no_spec[i]) for i in batch]
        rows = self.ring.rows(req_ids, keep=set(step.req_ids))
        self._update_ring(req_ids, rows, lengths, [token_ids_cpu[i] for i in batch])
        roots = [int(token_ids_cpu[i, n - 1]) for i, n in zip(batch, lengths)]
        tokens, parents = self._draft_tree(batch, rows, lengths, roots, step.block_table)
        if self.tree_verifier is None:
            for b, i in enumerate(batch):
                room = self.max_model_len - lengths[b] - 1
                drafts[i] = tokens[b][:max(0, min(len(tokens[b]), room))]
            return drafts
        self._hand_over_trees(batch, req_ids, lengths, roots, tokens, parents, step, drafts)
        return drafts

    def _hand_over_trees(self, batch: list[int], req_ids: list[str], lengths: list[int],
                         roots: list[int], tokens: list[list[int]], parents: torch.Tensor,
                         step: vllm_api.RunnerStep, drafts: list[list[int]]) -> None:
        """BFS drafts for tree-eligible requests (remembered for verification); the best path
        as a chain for the others."""
        assert self.tree_verifier is not None
        parents_np = parents.cpu().numpy()
        chains = best_path(torch.from_numpy(parents_np),  # host copy: no device syncs
                           tree_node_offsets(self.widths)[-2]).tolist()
        for b, i in enumerate(batch):
            room = max(0, self.max_model_len - lengths[b] - 1)
            if vllm_api.tree_eligible(step.sampling_params[i]):
                n = min(len(tokens[b]), room)
                drafts[i] = tokens[b][:n]
                self.tree_verifier.trees[req_ids[b]] = DraftedTree(
                    tokens=np.array([roots[b]] + tokens[b][:n], dtype=np.int64),
                    parents=parents_np[b, :n + 1].copy())
            else:
                self.stats["chain_fallback_sampling"] += 1
                path = [tokens[b][node - 1] for node in chains[b]]
                drafts[i] = path[:room]

    def _update_ring(self, req_ids: list[str], rows: list[int], lengths: list[int],
                     token_rows: list[np.ndarray]) -> None:
        """Writes K/V of committed positions [max(filled, n - window), n) of each request."""
        window = self.config.window
        ids, pos, row_of = [], [], []
        for req_id, row, n, toks in zip(req_ids, rows, lengths, token_rows):
            filled = self.ring.filled(req_id)
            if filled > n:  # a request id reused with a shorter history: rebuild
                filled = 0
            start = max(filled, n - window)
            if start < n:
                ids.append(toks[start:n])
                pos.append(np.arange(start, n))
                row_of.append(np.full(n - start, row))
            self.ring.mark_filled(req_id, n)
        if not ids:
            return
        device = self.target.device
        token_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64)).to(device)
        positions = torch.from_numpy(np.concatenate(pos).astype(np.int64)).to(device)
        row_index = torch.from_numpy(np.concatenate(row_of).astype(np.int64)).to(device)
        k, v = self.draft.self_kv(self.target.embed(token_ids), positions, self.rope)
        self.ring.write(row_index, positions, k, v)

    def _draft_tree(self, batch: list[int], rows: list[int], lengths: list[int],
                    roots: list[int], block_table: torch.Tensor
                    ) -> tuple[list[list[int]], torch.Tensor]:
        """Drafts every request's tree, one draft forward per level for the whole batch
        (replayed as one CUDA graph when `draft_graphs` allows).

        Returns:
            tokens: per request, the N draft tokens in BFS order (root excluded);
            parents: [B, N+1] BFS parents (root first, -1).
        """
        inputs = DraftInputs.from_requests(
            roots=roots, ring_rows=rows,
            ring_valid=[min(n, self.config.window) for n in lengths],
            root_positions=[n - 1 for n in lengths],
            # The target has cached K/V for every committed token but the newest.
            prefix_lens=[n - 1 for n in lengths],
            block_table=block_table[torch.tensor(batch, device=block_table.device)])
        if self.draft_graphs is not None and self.draft_graphs.covers(inputs):
            tokens, parents = self.draft_graphs.run(inputs)
        else:
            tokens, parents = self._draft_tree_tensors(
                inputs.to(self.target.device), max(inputs.prefix_lens_host))
        return tokens.tolist(), parents

    def _draft_tree_tensors(self, inputs: "DraftInputs", max_prefix: int
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
        device = self.target.device
        scale = self.arch.head_dim ** -0.5
        k_cache, v_cache = self._target_kv()
        batch_size = inputs.roots.shape[0]
        table = inputs.block_table
        prefix_t = inputs.prefix_lens
        # FlashAttention over the paged cache on the GPU; plain torch on the CPU.
        prefix_backend = "auto" if device.type == "cuda" else "torch"
        num_nodes = 1 + sum(self.widths)
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
                    out = grouped_ring_self_attention(q, self.ring.k, self.ring.v, ring_rows,
                                                      ring_valid, None, None, scale)
                    return out.reshape(-1, *out.shape[2:])
                k = k.reshape(batch_size, nodes_here, *k.shape[1:])
                v = v.reshape(batch_size, nodes_here, *v.shape[1:])
                scratch_k = k if scratch_k is None else torch.cat([scratch_k, k], dim=1)
                scratch_v = v if scratch_v is None else torch.cat([scratch_v, v], dim=1)
                seen = scratch_k.shape[1]
                visible = ancestors.gather(
                    1, level_nodes.unsqueeze(-1).expand(-1, -1, num_nodes))[:, :, 1:seen + 1]
                out = grouped_ring_self_attention(q, self.ring.k, self.ring.v, ring_rows,
                                                  ring_valid, scratch_k, scratch_v, scale,
                                                  visible)
                return out.reshape(-1, *out.shape[2:])

            def cross_attend(q, nodes_here=nodes_here):
                if max_prefix == 0:
                    return torch.zeros_like(q)
                cu = torch.arange(batch_size + 1, dtype=torch.int32, device=device) * nodes_here
                o, _ = attend_paged_prefix(q.contiguous(), k_cache, v_cache, table, prefix_t,
                                           cu, scale, max_seqlen_q=nodes_here,
                                           max_prefix_len=max_prefix, backend=prefix_backend)
                return o.to(q.dtype)

            positions = (root_pos + level).repeat_interleave(nodes_here)
            hidden = self.draft(self.target.embed(query.reshape(-1)), positions, self.rope,
                                self_attend, cross_attend)
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
