"""LongSpecProposer: LongSpec drafting inside vLLM's V1 model runner (``custom_class``).

vLLM loads it as a ``custom_class`` proposer (see `spec_config`); the runner hook in
`compat.patches` hands it, each step, what the custom-class interface leaves out (request ids,
prompt lengths, the block table, finished requests). Per step, for every request that just
produced a token, it updates the request's ring row from token ids and drafts its tree (see
`drafter`); ring rows are handed out per request id.

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
from ..draft.ring_cache import DraftKVRing
from ..health.guard import drafting_guard
from .beam_tree import best_path, tree_node_offsets
from .draft_graphs import DraftCudaGraphs, DraftInputs, draft_graphs_enabled
from .drafter import LongSpecDrafter
from .prompt_lookup import lookup_continuations
from .tree_step import DraftedTree, TreeVerifier

logger = logging.getLogger("vllm.longspec")


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
        self.draft: Any = None  # the drafter's serving layer, once loaded
        self.draft_graphs: DraftCudaGraphs | None = None
        self.stats = {"steps": 0, "drafted_requests": 0, "skipped_short_prompt": 0,
                      "chain_fallback_sampling": 0, "draft_seconds": 0.0,
                      "skipped_max_model_len": 0, "prompt_lookup_requests": 0}
        # benchmarks/bench_step_cost.py: device-synchronised wall time of every drafting step
        self._time_drafting = os.environ.get("LONGSPEC_TIME_DRAFTING") == "1"

    # ------------------------------------------------------------------ setup
    def load_model(self, target_model: Any) -> None:
        """Builds the draft beside the target (called by the runner after the target loads;
        memory allocated here is counted as model memory by vLLM's profiler)."""
        drafter = self.drafter = LongSpecDrafter(self.vllm_config, self.config,
                                                 self.max_num_reqs)
        drafter.load(target_model)
        self.target, self.draft = drafter.target, drafter.draft
        on_rank = drafter.on_rank
        if draft_graphs_enabled(self.target.device, self.vllm_config.model_config.enforce_eager,
                                on_rank.comm is not None):
            self.draft_graphs = DraftCudaGraphs(drafter.draft_tree, self.max_model_len,
                                                self.target.device)
        if self.tree_verifier is not None:
            vllm_api.check_tree_cudagraphs(self.vllm_config)
            self.tree_verifier.install()
            self.tree_verifier.comm = on_rank.comm
        shape = (f"tree {list(self.widths)}" if self.tree_verifier is not None
                 else f"chain of {self.depth}")
        logger.info("LongSpec draft %s loaded: window %d, %s, ring %.1f KiB/request "
                    "(TP rank %d of %d, V1 model runner)", self.config.draft,
                    self.config.window, shape, self.ring.nbytes_per_request / 1024,
                    on_rank.rank, on_rank.world_size)

    @property
    def ring(self) -> DraftKVRing:
        return self.drafter.ring

    @property
    def vocab_head(self) -> Any:
        return self.drafter.vocab_head

    def begin_step(self, step: vllm_api.RunnerStep) -> None:
        """Called by the runner hook right before `propose`."""
        self._step = step
        if step.finished_req_ids:
            self.ring.release(step.finished_req_ids)
            if self.tree_verifier is not None:
                self.tree_verifier.forget(step.finished_req_ids)

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
        if self.config.prompt_lookup_max > 0:
            self._copy_prompt_lookups(tokens, [token_ids_cpu[i] for i in batch], lengths)
        if self.tree_verifier is None:
            for b, i in enumerate(batch):
                room = self.max_model_len - lengths[b] - 1
                drafts[i] = tokens[b][:max(0, min(len(tokens[b]), room))]
            return drafts
        self._hand_over_trees(batch, req_ids, lengths, roots, tokens, parents, step, drafts)
        return drafts

    def _copy_prompt_lookups(self, tokens: list[list[int]], token_rows: list[np.ndarray],
                             lengths: list[int]) -> None:
        """Chains: copied continuations (`prompt_lookup`) replace the draft's tokens in place
        and extend them to ``num_speculative_tokens`` where the draft model drafts fewer
        (``draft_model_tokens``; the V1 runner takes drafts of any length up to that)."""
        width = max(lengths)
        history = torch.from_numpy(np.stack([row[:width] for row in token_rows]).astype(np.int64))
        copies, valid = lookup_continuations(
            history, torch.tensor(lengths), self.config.num_speculative_tokens,
            self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        for b, (row, ok) in enumerate(zip(copies.tolist(), valid.tolist())):
            if ok[0]:
                self.stats["prompt_lookup_requests"] += 1
                drafted = tokens[b]
                tokens[b] = [c if v else drafted[j] for j, (c, v) in enumerate(zip(row, ok))
                             if v or j < len(drafted)]

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
        self.drafter.write_ring(row_index, positions, token_ids)

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
            tokens, parents = self.drafter.draft_tree(
                inputs.to(self.target.device), max(inputs.prefix_lens_host))
        return tokens.tolist(), parents
