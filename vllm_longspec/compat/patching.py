"""Declared monkey-patches: each names its target, says why, keeps the original, applies once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("vllm.longspec")


@dataclass(frozen=True)
class Patch:
    """Replace ``owner.name`` by ``wrap(original)``.

    Attributes:
        owner: the class holding the attribute.
        name: attribute name (plain, static or class method).
        why: what vLLM lacks that this patch supplies, and when it can go.
        wrap: gets the original *function* (unwrapped from staticmethod/classmethod) and returns
            the replacement function; the descriptor kind is preserved.
    """

    owner: Any  # a class, or a module for module-level functions
    name: str
    why: str
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]


def apply_patch(patch: Patch) -> bool:
    """Applies `patch` unless already applied (register() runs several times per process)."""
    applied: dict[str, Patch] = patch.owner.__dict__.get("_longspec_patches", {})
    if patch.name in applied:
        return False
    raw = patch.owner.__dict__.get(patch.name)
    if raw is None:
        raise AttributeError(f"LongSpec patch target {patch.owner.__name__}.{patch.name} is "
                             "missing: this vLLM version is not supported")
    if isinstance(raw, staticmethod):
        replacement: Any = staticmethod(patch.wrap(raw.__func__))
    elif isinstance(raw, classmethod):
        replacement = classmethod(patch.wrap(raw.__func__))
    else:
        replacement = patch.wrap(raw)
    setattr(patch.owner, patch.name, replacement)
    if "_longspec_patches" not in patch.owner.__dict__:
        setattr(patch.owner, "_longspec_patches", {})
    patch.owner._longspec_patches[patch.name] = patch
    logger.debug("LongSpec patched %s.%s: %s", patch.owner.__name__, patch.name, patch.why)
    return True
