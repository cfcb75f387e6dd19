"""The beam tree's level expansion in two launches: the global top-k of (level nodes x vocabulary)
by cumulative log-probability.

PyTorch's top-k over chunks of the row (`engine.beam_tree.chunked_topk`) costs about 50 us per level
for 16 nodes x 32,768 tokens on an H200: a radix select, a second top-k and two bitonic sorts.
That is 0.26 ms of the drafting step's 1.81 ms at 32k (`benchmarks/results/h200-2026-12-05`,
profile). Here, for k up to 32:

1. one program per (request, chunk of the row) adds the parent's score to each log-probability
   in registers and extracts the chunk's k best by repeated max;
2. one program per request does the same over the chunks' candidates, so its output is already
   sorted.

Ties go to the lowest flat index at both stages, so the result is deterministic. (PyTorch leaves
the order of equal values unspecified.) The reference is ``beam_topk_ref`` (torch.topk).

Not timed on a GPU yet: the engine uses it only with LONGSPEC_BEAM_TOPK=triton.
`benchmarks/bench_beam_topk.py` times it. The first attempt ran out of its call's time while
compiling. The 128k vocabulary at 16 nodes took 49 s: its chunks are 8,192 to 32,768 elements
(one per `max_candidates` tried), each unrolled 16 times. Long rows need a looped stage 1 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 32
STAGE2_CANDIDATES = 4096  # default: at most this many candidates per request reach stage 2


@triton.jit
def _extract_top_k(values, index, alive, out_values_ptr, out_index_ptr, big,
                   K: tl.constexpr):
    """Stores the K largest of `values` (ties: the smallest `index`), best first."""
    for j in tl.static_range(K):
        best = tl.max(tl.where(alive, values, float("-inf")), axis=0)
        pick = tl.min(tl.where(alive & (values == best), index, big), axis=0)
        tl.store(out_values_ptr + j, best)
        tl.store(out_index_ptr + j, pick)
        alive = alive & (index != pick)


@triton.jit
def _chunk_top_k_kernel(logprobs_ptr, scores_ptr, cand_values_ptr, cand_index_ptr,
                        stride_lb, stride_sb, row_length, vocab, num_chunks,
                        K: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    flat = c * CHUNK + tl.arange(0, CHUNK).to(tl.int64)
    inside = flat < row_length
    logprob = tl.load(logprobs_ptr + b * stride_lb + flat, mask=inside, other=float("-inf"))
    score = tl.load(scores_ptr + b * stride_sb + flat // vocab, mask=inside, other=0.0)
    out = (b * num_chunks + c) * K
    _extract_top_k(logprob + score, flat, inside, cand_values_ptr + out, cand_index_ptr + out,
                   row_length, K)


@triton.jit
def _merge_top_k_kernel(cand_values_ptr, cand_index_ptr, best_ptr, index_ptr, num_candidates,
                        big, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.arange(0, BLOCK)
    inside = slot < num_candidates
    values = tl.load(cand_values_ptr + b * num_candidates + slot, mask=inside,
                     other=float("-inf"))
    index = tl.load(cand_index_ptr + b * num_candidates + slot, mask=inside, other=big)
    _extract_top_k(values, index, inside, best_ptr + b * K, index_ptr + b * K, big, K)


def beam_topk_supported(logprobs: torch.Tensor, k: int) -> bool:
    """Whether `beam_topk` takes this case (fp32, k <= MAX_K, the row's last dim contiguous)."""
    return (logprobs.dtype == torch.float32 and 1 <= k <= MAX_K and logprobs.dim() == 3
            and logprobs.stride(2) == 1 and logprobs.stride(1) == logprobs.shape[2])


def _chunk_length(row_length: int, k: int, max_candidates: int) -> int:
    """A power of two >= 1024 that leaves at most `max_candidates` candidates for stage 2."""
    chunk = 1024
    while triton.cdiv(row_length, chunk) * k > max_candidates:
        chunk *= 2
    return chunk


def beam_topk(logprobs: torch.Tensor, scores: torch.Tensor, k: int,
              max_candidates: int = STAGE2_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores[b, w] + logprobs[b, w, v]`` over (w, v), per request.

    Args:
        logprobs: [B, W, V] fp32 the draft's log-probabilities at a level's W nodes
            (rows contiguous, see `beam_topk_supported`).
        scores: [B, W] fp32 the nodes' cumulative log-probabilities.
        k: how many, 1..MAX_K and <= W * V.
        max_candidates: the most candidates stage 1 hands to stage 2 (fewer: longer chunks).
    Returns:
        best [B, k] fp32 descending, index [B, k] int64 into the flattened (W * V) row
        (token = index % V, parent = index // V).
    """
    batch, nodes, vocab = logprobs.shape
    row_length = nodes * vocab
    assert beam_topk_supported(logprobs, k) and k <= row_length, (logprobs.shape, k)
    scores = scores.float().contiguous()
    chunk = _chunk_length(row_length, k, max_candidates)
    num_chunks = triton.cdiv(row_length, chunk)
    device = logprobs.device
    cand_values = torch.empty(batch, num_chunks * k, dtype=torch.float32, device=device)
    cand_index = torch.empty(batch, num_chunks * k, dtype=torch.int64, device=device)
    best = torch.empty(batch, k, dtype=torch.float32, device=device)
    index = torch.empty(batch, k, dtype=torch.int64, device=device)
    if batch == 0:
        return best, index
    _chunk_top_k_kernel[(batch, num_chunks)](
        logprobs, scores, cand_values, cand_index, logprobs.stride(0), scores.stride(0),
        row_length, vocab, num_chunks, K=k, CHUNK=chunk, num_warps=8 if chunk >= 4096 else 4)
    block = triton.next_power_of_2(num_chunks * k)
    _merge_top_k_kernel[(batch,)](
        cand_values, cand_index, best, index, num_chunks * k, row_length, K=k, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return best, index


def beam_topk_ref(logprobs: torch.Tensor, scores: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk of the same (the order of exactly equal values is unspecified there)."""
    batch = logprobs.shape[0]
    cumulative = (scores.float().unsqueeze(-1) + logprobs).reshape(batch, -1)
    return cumulative.topk(k, dim=-1)
