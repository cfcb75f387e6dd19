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
3. level j: draft token j queries the ring + the K/V of draft tokens 1..j (scratch for this step
   only) and the same target prefix; and so on for `num_speculative_tokens` levels.

Drafts are the draft's argmax: a point-mass proposal, which vLLM's rejection sampler verifies
losslessly for greedy and sampled requests alike (draft_probs=None).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..compat import vllm_api
from ..config import LongSpecConfig
from ..draft.checkpoint import build_draft_layer, check_draft_fits_target, load_draft_checkpoint
from ..draft.model import DraftArchitecture, LongSpecDraftLayer
from ..draft.ring_cache import DraftKVRing
from ..draft.rope import rope_from_vllm_rotary
from ..health.guard import drafting_guard
from .draft_attention import paged_prefix_attention, ring_self_attention

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
        if self.config.is_tree:
            raise NotImplementedError("LongSpec token trees are not available yet: omit "
                                      "tree_widths to speculate with a chain")
        self.max_model_len = vllm_config.model_config.max_model_len
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.depth = self.config.num_speculative_tokens
        self._step: vllm_api.RunnerStep | None = None
        self.draft: LongSpecDraftLayer | None = None
        self.stats = {"steps": 0, "drafted_requests": 0, "skipped_short_prompt": 0,
                      "skipped_max_model_len": 0}

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
        self.draft = build_draft_layer(ckpt, dtype=self.target.dtype, device=self.target.device)
        self.arch = ckpt.arch
        self.rope = rope_from_vllm_rotary(self.target.rotary)
        self.ring = DraftKVRing(self.max_num_reqs, self.config.window,
                                ckpt.arch.num_key_value_heads, ckpt.arch.head_dim,
                                self.target.dtype, self.target.device)
        self._target_attn = None
        logger.info("LongSpec draft %s loaded: window %d, chain of %d, ring %.1f KiB/request",
                    self.config.draft, self.config.window, self.depth,
                    self.ring.nbytes_per_request / 1024)

    def begin_step(self, step: vllm_api.RunnerStep) -> None:
        """Called by the runner hook right before `propose`."""
        self._step = step
        if step.finished_req_ids:
            self.ring.release(step.finished_req_ids)

    def _target_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._target_attn is None:
            self._target_attn = vllm_api.last_attention_layer(self.vllm_config)
        return vllm_api.paged_kv_views(self._target_attn.kv_cache, self.arch.head_dim)

    # ------------------------------------------------------------------ drafting
    @drafting_guard  # a drafting error decodes the step without drafts; stats go to /metrics
    @torch.inference_mode()
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
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
        if not batch:
            return drafts
        self.stats["drafted_requests"] += len(batch)
        req_ids = [step.req_ids[i] for i in batch]
        lengths = [int(num_tokens_no_spec[i]) for i in batch]
        rows = self.ring.rows(req_ids, keep=set(step.req_ids))
        self._update_ring(req_ids, rows, lengths, [token_ids_cpu[i] for i in batch])
        tokens = self._draft_chain(batch, rows, lengths, token_ids_cpu, step.block_table)
        for b, i in enumerate(batch):
            room = self.max_model_len - lengths[b] - 1
            drafts[i] = tokens[b][:max(0, min(self.depth, room))]
        return drafts

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

    def _draft_chain(self, batch: list[int], rows: list[int], lengths: list[int],
                     token_ids_cpu: np.ndarray, block_table: torch.Tensor) -> list[list[int]]:
        device = self.target.device
        scale = self.arch.head_dim ** -0.5
        k_cache, v_cache = self._target_kv()
        table = block_table[torch.tensor(batch, device=block_table.device)]
        # The target has cached K/V for every committed token but the newest.
        prefix_lens = [n - 1 for n in lengths]
        query_req = list(range(len(batch)))
        row_t = torch.tensor(rows, device=device)
        valid_t = torch.tensor([min(n, self.config.window) for n in lengths], device=device)
        query = torch.tensor([int(token_ids_cpu[i, n - 1]) for i, n in zip(batch, lengths)],
                             device=device)
        positions = torch.tensor([n - 1 for n in lengths], device=device)
        scratch_k: list[torch.Tensor] = []  # K/V of draft tokens 1..j, each [B, Hk, D]
        scratch_v: list[torch.Tensor] = []
        out: list[torch.Tensor] = []
        for level in range(self.depth):
            def self_attend(q, k, v, level=level):
                if level == 0:
                    extra_k = extra_v = None  # the root is committed: already in its ring
                else:
                    extra_k = torch.stack(scratch_k + [k], dim=1)
                    extra_v = torch.stack(scratch_v + [v], dim=1)
                    scratch_k.append(k)
                    scratch_v.append(v)
                return ring_self_attention(q, self.ring.k, self.ring.v, row_t, valid_t,
                                           extra_k, extra_v, scale)

            def cross_attend(q):
                o, _ = paged_prefix_attention(q, k_cache, v_cache, table, query_req,
                                              prefix_lens, scale)
                return o.to(q.dtype)

            hidden = self.draft(self.target.embed(query), positions, self.rope,
                                self_attend, cross_attend)
            logits = self.target.compute_logits(hidden)
            query = logits.argmax(dim=-1)
            positions = positions + 1
            out.append(query)
        return torch.stack(out, dim=1).tolist()
