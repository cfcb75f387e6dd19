"""Token-tree verification on Model Runner V2 (vLLM 0.26, CUDA): what touches V2's objects.

* `TreeRejectionSampler` stands in for V2's ``RejectionSampler`` in LongSpec tree engines: the
  target's logits are processed by vLLM's own sampler (logit bias, penalties, bad words,
  temperature, min-p, top-k/top-p), then every row's tree is accepted on the device
  (`engine.tree_device`), and the result is returned in the rejection sampler's layout
  (``[num_reqs, num_draft_tokens + 1]`` tokens, ``num_sampled``, ``num_rejected``), which V2's
  bookkeeping (token history, computed tokens, the scheduler) takes as the accepted chain.
* `step_layout` reads a step's host-side arrays off V2's ``InputBatch``.
* `tree_ineligible_slots` says which requests verify a chain instead of a tree, from V2's
  sampling states.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..engine.tree_device import DeviceTreeAcceptance, accept_sampled_device, select_rows
from ..engine.v2_tree import StepLayout, TreeSlots
from ..engine.verification import set_active_plan


def step_layout(input_batch: Any) -> StepLayout:
    """The host view of a V2 step (``InputBatch``; no device reads)."""
    num_reqs = int(input_batch.num_reqs)
    drafts = input_batch.num_draft_tokens_per_req
    if drafts is None:
        drafts = np.zeros(num_reqs, dtype=np.int32)
    return StepLayout(
        num_tokens=int(input_batch.num_tokens),
        query_start=np.asarray(input_batch.query_start_loc_np[:num_reqs + 1]),
        num_drafts=np.asarray(drafts[:num_reqs]),
        slots=np.asarray(input_batch.idx_mapping_np[:num_reqs]),
        seq_len_bound=input_batch.seq_lens_cpu_upper_bound[:num_reqs].numpy(),
        req_ids=list(input_batch.req_ids))


def tree_ineligible_slots(sampler: Any, slots: np.ndarray) -> np.ndarray:
    """[len(slots)] bool: requests whose sampling depends on the tokens before each position
    (penalties, bad words) or reports per-position results (logprobs): they verify chains."""
    out = np.zeros(len(slots), dtype=bool)
    penalties = getattr(sampler, "penalties_state", None)
    if penalties is not None and hasattr(penalties, "use_penalty"):
        out |= np.asarray(penalties.use_penalty)[slots]
    bad_words = getattr(sampler, "bad_words_state", None)
    if bad_words is not None and hasattr(bad_words, "num_bad_words"):
        out |= np.asarray(bad_words.num_bad_words.np)[slots] > 0
    states = sampler.sampling_states
    out |= np.asarray(states.num_logprobs)[slots] >= 0
    token_ids = getattr(sampler, "logprob_token_ids_state", None)
    if token_ids is not None and hasattr(token_ids, "num_token_ids"):
        out |= np.asarray(token_ids.num_token_ids.np)[slots] > 0
    return out


class TreeRejectionSampler:
    """V2's rejection sampler for LongSpec tree engines (see the module docstring).

    Args:
        sampler: V2's ``Sampler`` (its states and ``apply_sampling_params``).
        chain_sampler: V2's ``RejectionSampler`` it replaces (its logprobs helper is reused:
            only chain rows ask for logprobs).
        slots: the trees recorded per request slot.
    """

    def __init__(self, sampler: Any, chain_sampler: Any, slots: TreeSlots):
        self.sampler = sampler
        self.chain_sampler = chain_sampler
        self.slots = slots
        self.last: DeviceTreeAcceptance | None = None  # for the speculator's KV compaction
        self.stats = {"steps": 0}

    def __call__(self, logits: torch.Tensor, input_batch: Any,
                 draft_logits: torch.Tensor | None = None) -> Any:
        from vllm.v1.worker.gpu.input_batch import get_num_sampled_and_rejected
        from vllm.v1.worker.gpu.metrics.logits import get_num_nans
        from vllm.v1.worker.gpu.sample.output import SamplerOutput

        set_active_plan(None)  # the step's attention is done
        sampler = self.sampler
        num_nans = get_num_nans(logits) if sampler.compute_nans else None
        node_tokens = input_batch.input_ids[input_batch.logits_indices]
        positions = input_batch.positions[input_batch.logits_indices]
        idx_np = input_batch.idx_mapping_np
        processed = sampler.apply_sampling_params(
            logits, input_batch.expanded_idx_mapping, idx_np, positions, node_tokens,
            input_batch.expanded_local_pos)

        num_reqs = int(input_batch.num_reqs)
        n = self.slots.num_nodes
        device = logits.device
        cu = input_batch.cu_num_logits[:num_reqs + 1].long()
        nodes = torch.arange(n, device=device)
        logits_rows = (cu[:-1].unsqueeze(1) + nodes).clamp(max=logits.shape[0] - 1)
        valid = nodes < (cu[1:] - cu[:-1]).unsqueeze(1)
        slots = input_batch.idx_mapping[:num_reqs].long()
        tokens = node_tokens[logits_rows].long()

        temperature = sampler.sampling_states.temperature
        temps = np.asarray(temperature.np)[idx_np[:num_reqs]]
        greedy_result = sampled_result = None
        if np.any(temps == 0):
            greedy_result = self.slots.accept_greedy(slots, tokens, valid, logits_rows,
                                                     processed.argmax(dim=-1))
        if np.any(temps != 0):
            sampled_result = accept_sampled_device(
                self.slots.rows(slots, tokens, valid, logits_rows), processed,
                torch.logsumexp(processed.float(), dim=-1),
                sampler.sampling_states.seeds.gpu[slots], positions[cu[:-1]].long())
        if greedy_result is None:
            result = sampled_result
        elif sampled_result is None:
            result = greedy_result
        else:
            result = select_rows(temperature.gpu[slots] == 0, greedy_result, sampled_result)
        assert result is not None
        sampled = result.tokens
        num_sampled = result.num_sampled.to(torch.int32)

        logprobs = self.chain_sampler._get_logprobs_tensors(
            input_batch, sampled, num_sampled,
            processed if sampler.logprobs_mode in ("processed_logprobs", "processed_logits")
            else logits)
        num_sampled, num_rejected = get_num_sampled_and_rejected(
            num_sampled, input_batch.seq_lens, input_batch.cu_num_logits,
            input_batch.idx_mapping, sampler.req_states.prefill_len.gpu)
        self.last = result
        self.stats["steps"] += 1
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs,
                             num_nans=num_nans, num_sampled=num_sampled,
                             num_rejected=num_rejected)
