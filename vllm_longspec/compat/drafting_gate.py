"""Whether vLLM's V1 runner calls the LongSpec proposer near ``max_model_len``.

Before drafting, vLLM's V1 runner checks ``GPUModelRunner._input_fits_in_drafter``: when the
batch's longest ``seq_len`` plus ``num_speculative_tokens`` would pass ``max_model_len`` it
skips drafting for the *whole batch* that step (every request decodes one plain token). Two
things make that check wrong for LongSpec:

- ``seq_len`` already counts the drafts verified this step, and a tree's
  ``num_speculative_tokens`` is its node count: a 68-node tree stopped drafting 2 x 68 = 136
  tokens before ``max_model_len`` (a demo with a 64-token margin lost drafting for most of its
  output: mean acceptance 1.46 instead of 3.05);
- one request near its limit turned speculation off for every other request of the batch.

LongSpec's proposer checks each request itself: it skips one whose committed length leaves no
room for a draft (counted as the ``max_model_len`` fallback in /metrics) and cuts the others'
drafts -- a chain, or a tree's BFS prefix, which is a tree -- to the room left, which is what
vLLM's scheduler would schedule. So for LongSpec this returns True whenever vLLM has the
metadata to verify drafts; other proposers get vLLM's answer unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def wrap_input_fits_in_drafter(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(original)
    def _input_fits_in_drafter(self, common_attn_metadata, *args, **kwargs) -> bool:
        if common_attn_metadata is not None and getattr(
                getattr(self, "drafter", None), "is_longspec_proposer", False):
            return True
        return original(self, common_attn_metadata, *args, **kwargs)

    return _input_fits_in_drafter
