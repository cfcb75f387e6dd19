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
from .verification import (TreeRowCandidate, TreeVerificationPlan, active_plan, build_plan,
                           set_active_plan)
from .verify_attention import wrap_attention_forward

logger = logging.getLogger("vllm_longspec")


@dataclass
class DraftedTree:
    """The tree proposed for a request, in the BFS order its drafts were handed to vLLM."""

    tokens: np.ndarray   # [n + 1] node tokens, the root (last committed token) first
    parents: np.ndarray  # [n + 1] parent of each node, -1 for the root


@dataclass
class TreeVerifier:
    vllm_config: Any
    trees: dict[str, DraftedTree] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {
        "tree_rows": 0, "tree_tokens_accepted": 0, "tree_rows_skipped": 0})
    comm: Any = None  # draft.sharding.TPComm under tensor parallelism (set by the proposer)
    _slots: torch.Tensor | None = None
    _kv_table: Any = None
    _kv_views: list | None = None

    # ------------------------------------------------------------------ setup
    def install(self) -> None:
        """Wraps every target attention layer (called once the target is loaded)."""
        cache_dtype = str(self.vllm_config.cache_config.cache_dtype)
        layers = vllm_api.target_attention_layers(self.vllm_config)
        for name, layer in layers.items():
            why = vllm_api.tree_attention_refusal(layer, cache_dtype)
            if why is not None:
                raise ValueError(f"LongSpec token trees need plain causal attention in every "
                                 f"target layer; {name} uses {why}. Omit tree_widths to "
                                 "speculate with a chain.")
            impl = layer.impl
            if not getattr(impl.forward, "longspec_tree_attention", False):
                impl.forward = wrap_attention_forward(impl, impl.forward)

    # ------------------------------------------------------------------ per step
    def after_prepare_inputs(self, runner: Any, scheduler_output: Any) -> None:
        set_active_plan(None)
        if not scheduler_output.scheduled_spec_decode_tokens or (
                not self.trees and self.comm is None):  # under TP all ranks go on (collective)
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
            self._compact(src, dst)

    def _compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        from vllm_longspec_kernels import (build_kv_cache_table, compact_kv_caches,
                                           compact_kv_caches_ref)

        if self._kv_views is None:
            self._kv_views = [
                vllm_api.paged_kv_views(layer.kv_cache, layer.impl.head_size, layer)
                for layer in vllm_api.target_attention_layers(self.vllm_config).values()]
        if src.is_cuda:  # one Triton launch for all layers
            if self._kv_table is None:
                self._kv_table = build_kv_cache_table(self._kv_views, "separate")
            compact_kv_caches(self._kv_table, src, dst)
        else:  # the CPU cache's K may be stored transposed: plain indexing through the views
            compact_kv_caches_ref(self._kv_views, src, dst, layout="separate")

    # ------------------------------------------------------------------ bookkeeping
    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.trees.pop(req_id, None)
