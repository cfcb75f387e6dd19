"""Whether the Triton top-k of a beam-tree level (`level_topk.beam_topk`) can replace PyTorch's
chunked top-k on a device.

The drafter asks once per device when it loads. The kernels are held to torch.topk under Triton's
interpreter in CI (`tests/kernels/test_level_topk.py`); this guards a GPU, a compiler or a Triton
version they have not met. It also compiles, before any CUDA graph is captured, every kernel the
tree's levels launch (one per padded width). A kernel that fails to compile or disagrees is not
used: the drafter keeps the torch top-k, with a warning.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.longspec")


def fused_topk_works(widths: tuple[int, ...], device: torch.device, chunk: int | None = None,
                     vocab: int = 20_000) -> bool:
    """Whether `beam_topk` equals torch.topk on `device` for every width of the tree.

    Args:
        widths: the tree's level widths.
        chunk: `beam_topk`'s chunk (None: the engine's); tests under the interpreter pass small
            ones.
        vocab: the check's vocabulary: 16 nodes x 20,000 spans several chunks per program.
    """
    try:
        return _agrees(widths, device, chunk, vocab)
    except Exception as error:  # noqa: BLE001 -- any failure means: use the torch top-k
        logger.warning("LongSpec: Triton beam-tree top-k unavailable on %s (%r); using "
                       "torch.topk", device, error)
        return False


def _agrees(widths: tuple[int, ...], device: torch.device, chunk: int | None,
            vocab: int) -> bool:
    from vllm_longspec_kernels.level_topk import (CHUNK, MAX_K, beam_topk, beam_topk_ref,
                                                  padded_k)

    gen = torch.Generator().manual_seed(0)
    by_padded = {padded_k(w): w for w in sorted(set(widths)) if w <= MAX_K}
    for width in by_padded.values():
        nodes = 16
        logprobs = torch.randn(2, nodes, vocab, generator=gen).log_softmax(-1)
        scores = torch.randn(2, nodes, generator=gen) * 4
        best, index = beam_topk(logprobs.to(device), scores.to(device), width,
                                chunk=chunk or CHUNK)
        expected_best, expected_index = beam_topk_ref(logprobs, scores, width)
        # Random floats: no ties, so the indices are the same in the same order.
        if not (torch.equal(best.cpu(), expected_best)
                and torch.equal(index.cpu(), expected_index)):
            logger.warning("LongSpec: the Triton beam-tree top-k disagrees with torch.topk on "
                           "%s (width %d); using torch.topk", device, width)
            return False
    logger.info("LongSpec: Triton beam-tree top-k on %s (self-check passed for widths %s)",
                device, sorted(by_padded.values()))
    return True
