"""Runs tree verification inside vLLM's model runner, around its chain-verification step.

Called by the runner hooks in `compat.patches`:

* `TreeVerifier.after_prepare_inputs` (after ``_prepare_inputs``): finds the rows that scheduled
  one of our trees, builds the step's `TreeVerificationPlan`, rewrites those rows' positions to
  ``root + depth`` and activates the plan for the attention layers.
* `TreeVerifier.after_sample` (after ``_sample``): vLLM's rejection sampler has treated every
  row as a chain; the tree rows' outputs are replaced by `tree_acceptance`'s, then the accepted
  paths' K/V are compacted in every target layer with one kernel launch, and the plan ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compat import vllm_api
from .tp_agreement import agree_on_acceptance, agree_on_tree_rows
from .tree_acceptance import accept_trees, compaction_slots
from .verification import (TreeRowCandidate, active_plan,
                           ancestor_masks, build_plan, set_active_plan)
from .verify_attention import FullGraphTreeMasks, TreeVerifyingImpl, set_full_graph_masks

logger = logging.getLogger("vllm.longspec")


@dataclass
class DraftedTree:
    """The tree proposed for a request, in the BFS order its drafts were handed to vLLM."""

    tokens: np.ndarray   # [n + 1] node tokens, the root (last committed token) first
    parents: np.ndarray  # [n + 1] parent of each node, -1 for the root


class KVPathCompactor:
    """Moves accepted paths' K/V between cache slots in every target layer (one Triton launch
    on the GPU; plain indexing on the CPU, whose cache may store K transposed).

    Called with ``(src, dst)`` [M] int64 flat cache slots; entries with a negative slot are
    skipped (fixed-size calls from the V2 runner)."""

    def __init__(self, vllm_config: Any):
        self._views = [
            vllm_api.paged_kv_views(layer.kv_cache, layer.impl.head_size, layer)
            for layer in vllm_api.target_attention_layers(vllm_config).values()]
        self._table: Any = None

    def warm_up(self, entries_per_request: int, max_requests: int, device: torch.device) -> None:
        """Compiles the kernel for every call size the V2 runner can make (its tile follows the
        next power of two of ``requests x entries_per_request``) with calls that move nothing,
        so that no tree step pays a Triton compilation."""
        powers_of_two = [1 << i for i in range((max_requests - 1).bit_length())]
        for requests in powers_of_two + [max_requests]:
            skipped = torch.full((requests * entries_per_request,), -1, dtype=torch.int64,
                                 device=device)
            self(skipped, skipped)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        from vllm_longspec_kernels import (build_kv_cache_table, compact_kv_caches,
                                           compact_kv_caches_ref)

        if src.is_cuda:
            if self._table is None:
                self._table = build_kv_cache_table(self._views, "separate")
            compact_kv_caches(self._table, src, dst)
        else:
            compact_kv_caches_ref(self._views, src, dst, layout="separate")


@dataclass
class TreeVerifier:
    vllm_config: Any
    trees: dict[str, DraftedTree] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {
        "tree_rows": 0, "tree_tokens_accepted": 0, "tree_rows_skipped": 0})
    comm: Any = None  # draft.sharding.TPComm under tensor parallelism (set by the proposer)
    _slots: torch.Tensor | None = None
    _compactor: "KVPathCompactor | None" = None
    _full_graph_masks: FullGraphTreeMasks | None = None
    _chain_parents: np.ndarray | None = None
    _chain_masks: torch.Tensor | None = None  # [max_tokens, W] chain masks (to reset rows)
    _tree_mask_tokens: int = 0  # leading mask rows that may hold trees

    # ------------------------------------------------------------------ setup
    def install(self, always_mask_buffer: bool = False) -> FullGraphTreeMasks | None:
        """Checks that every target attention layer attends through LongSpec's tree backend
        (called once the target is loaded) and allocates the uniform batches' mask buffer
        (`FullGraphTreeMasks`, returned): with full CUDA graphs, or always (Model Runner V2
        attends every uniform batch through it, eager ones too)."""
        cache_dtype = str(self.vllm_config.cache_config.cache_dtype)
        layers = vllm_api.target_attention_layers(self.vllm_config)
        for name, layer in layers.items():
            why = vllm_api.tree_attention_refusal(layer, cache_dtype)
            if why is not None:
                raise ValueError(f"LongSpec token trees need plain causal attention in every "
                                 f"target layer; {name} uses {why}. Omit tree_widths to "
                                 "speculate with a chain.")
            if not isinstance(layer.impl, TreeVerifyingImpl):
                raise ValueError(
                    f"LongSpec token trees: target layer {name} attends with "
                    f"{type(layer.impl).__name__}, not LongSpec's tree attention backend "
                    "(AttentionBackendEnum.CUSTOM, selected when tree_widths is set); omit "
                    "tree_widths to speculate with a chain.")
        set_full_graph_masks(None)
        if (always_mask_buffer or vllm_api.uses_full_cudagraphs(self.vllm_config)) \
                and torch.cuda.is_available():
            self._full_graph_masks = self._allocate_full_graph_masks()
            set_full_graph_masks(self._full_graph_masks)
        return self._full_graph_masks

    def _allocate_full_graph_masks(self) -> FullGraphTreeMasks:
        from vllm_longspec_kernels import tree_mask_from_parents, tree_mask_num_words

        query_len = 1 + int(self.vllm_config.speculative_config.num_speculative_tokens)
        max_tokens = int(self.vllm_config.scheduler_config.max_num_batched_tokens)
        rows = -(-max_tokens // query_len)
        device = torch.device("cuda", torch.cuda.current_device())
        chain = torch.arange(-1, query_len - 1, device=device).repeat(rows)
        cu = torch.arange(rows + 1, dtype=torch.int32, device=device) * query_len
        masks = tree_mask_from_parents(chain, cu, tree_mask_num_words(query_len), query_len)
        self._chain_parents = np.arange(-1, query_len - 1, dtype=np.int64)
        self._chain_masks = masks.contiguous()
        return FullGraphTreeMasks(masks=masks.clone(), query_len=query_len,
                                  max_model_len=int(self.vllm_config.model_config.max_model_len))

    def _uniform_rows(self, scheduler_output: Any) -> int:
        """Requests of the step when it is uniform (every request scheduled exactly the full
        graphs' query length) and full-graph masks are in use; else 0."""
        graphs = self._full_graph_masks
        if graphs is None:
            return 0
        counts = scheduler_output.num_scheduled_tokens
        if not counts or any(n != graphs.query_len for n in counts.values()):
            return 0
        return len(counts)

    def _fill_full_graph_masks(self, num_rows: int,
                               candidates: list[TreeRowCandidate]) -> None:
        """Masks of a uniform step's rows: tree rows their trees, every other row a chain
        (rows holding a tree from an earlier step are reset)."""
        graphs = self._full_graph_masks
        assert graphs is not None and self._chain_masks is not None
        q = graphs.query_len
        if candidates:
            parents = np.tile(self._chain_parents, (num_rows, 1))
            for cand in candidates:
                parents[cand.row] = cand.parents[:q]
            masks = torch.from_numpy(ancestor_masks(parents, graphs.masks.shape[1]))
            graphs.masks[:masks.shape[0]].copy_(masks, non_blocking=True)
            self._tree_mask_tokens = max(self._tree_mask_tokens, masks.shape[0])
        elif self._tree_mask_tokens:
            graphs.masks[:self._tree_mask_tokens].copy_(
                self._chain_masks[:self._tree_mask_tokens])
            self._tree_mask_tokens = 0

    # ------------------------------------------------------------------ per step
    def after_prepare_inputs(self, runner: Any, scheduler_output: Any) -> None:
        set_active_plan(None)
        # vLLM replays a full CUDA graph for every "uniform" batch (each request scheduled
        # exactly 1 + num_draft_tokens tokens -- a prefill chunk of that size too); the graph's
        # attention takes each row's mask from the persistent buffer, so it is set every time.
        uniform_rows = self._uniform_rows(scheduler_output)
        if not scheduler_output.scheduled_spec_decode_tokens or (
                not self.trees and self.comm is None):  # under TP all ranks go on (collective)
            if uniform_rows:
                self._fill_full_graph_masks(uniform_rows, [])
            return
        sched = vllm_api.scheduled_drafts(runner, scheduler_output)
        num_reqs = len(sched.req_ids)
        num_draft = np.zeros(num_reqs, dtype=np.int64)
        candidates: list[TreeRowCandidate] = []
        for row, req_id in enumerate(sched.req_ids):
            drafts = sched.drafts.get(req_id) or []
            num_draft[row] = len(drafts)
            tree = self.trees.get(req_id)
            if tree is None or not drafts:
                continue
            n = len(drafts) + 1
            if (sched.num_scheduled.get(req_id) != n or len(tree.tokens) < n
                    or list(tree.tokens[1:n]) != list(drafts)):
                self.stats["tree_rows_skipped"] += 1  # verified as a chain: still lossless
                continue
            candidates.append(TreeRowCandidate(
                row=row, req_id=req_id, query_start=int(sched.query_start[row]),
                num_scheduled=n, num_computed=int(sched.num_computed[row]),
                parents=tree.parents, tokens=tree.tokens))
        positions = vllm_api.runner_positions(runner)
        if self.comm is not None:  # tree rows only where every rank holds the scheduled tree
            candidates = agree_on_tree_rows(candidates, num_reqs, self.comm, positions.device,
                                            self.stats)
        if uniform_rows:
            self._fill_full_graph_masks(uniform_rows, candidates)
        plan, pos_index, pos_values = build_plan(candidates, num_draft, sched.total_tokens,
                                                 positions.device)
        if plan is None:
            return
        positions[pos_index] = pos_values.to(positions.dtype)
        self._slots = vllm_api.runner_slot_mapping(runner, sched.total_tokens)[
            plan.token_index].clone()
        set_active_plan(plan)

    def after_sample(self, runner: Any, sampler_output: Any, logits: torch.Tensor) -> None:
        plan = active_plan()
        set_active_plan(None)
        if plan is None:
            return
        results = accept_trees(logits, plan, runner.input_batch.sampling_metadata,
                               runner.input_batch.num_reqs,
                               vllm_api.apply_sampling_constraints)
        if self.comm is not None:  # tensor parallelism: every rank keeps rank 0's paths
            results = agree_on_acceptance(results, plan, self.comm, self.stats)
        out = sampler_output.sampled_token_ids
        width = out.shape[1]
        rows = torch.full((plan.num_rows, width), -1, dtype=out.dtype)
        for j, result in enumerate(results):
            rows[j, :len(result.tokens)] = torch.tensor(result.tokens, dtype=out.dtype)
            self.stats["tree_tokens_accepted"] += len(result.nodes)
        out[plan.rows] = rows.to(out.device)
        self.stats["tree_rows"] += plan.num_rows
        assert self._slots is not None
        src, dst = compaction_slots(plan, self._slots, results)
        if src.numel():
            if self._compactor is None:
                self._compactor = KVPathCompactor(self.vllm_config)
            self._compactor(src, dst)

    # ------------------------------------------------------------------ bookkeeping
    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.trees.pop(req_id, None)
