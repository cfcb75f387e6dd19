"""Counts the steps vLLM decodes without asking the drafter, for LongSpec's health summary.

Before drafting, vLLM's runner checks ``GPUModelRunner._input_fits_in_drafter``: when the
longest sequence of the batch plus ``num_speculative_tokens`` would pass the drafter's
``max_model_len``, it skips drafting for the *whole batch* that step (every request decodes one
plain token). LongSpec's proposer is not called then, so it cannot count these fallbacks itself;
this wrapper adds the batch's requests to the proposer's ``skipped_max_model_len`` counter.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def wrap_input_fits_in_drafter(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(original)
    def _input_fits_in_drafter(self, common_attn_metadata, *args, **kwargs) -> bool:
        fits = original(self, common_attn_metadata, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if not fits and common_attn_metadata is not None and getattr(
                drafter, "is_longspec_proposer", False):
            _count_skipped_batch(drafter, int(getattr(common_attn_metadata, "num_reqs", 0)))
        return fits

    return _input_fits_in_drafter


def _count_skipped_batch(drafter: Any, num_reqs: int) -> None:
    from ..health.guard import publish

    drafter.stats["skipped_max_model_len"] = (
        drafter.stats.get("skipped_max_model_len", 0) + num_reqs)
    publish(drafter)
