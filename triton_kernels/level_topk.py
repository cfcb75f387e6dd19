"""The beam tree's level expansion in a few launches: the global top-k of (level nodes x
vocabulary) by cumulative log-probability.

PyTorch's top-k over chunks of the row (`engine.beam_tree.chunked_topk`) costs about 50 us per level
for 16 nodes x 32,768 tokens on an H200: a radix select, a second top-k and two bitonic sorts.
That is 0.26 ms of the drafting step's 1.81 ms at 32k (`benchmarks/results/h200-2026-12-05`,
profile). Here, for k up to 32:

1. one program per (request, chunk of `CHUNK` elements) adds the parent's score to each
   log-probability in registers and extracts the chunk's k best by repeated max;
2. one program per (request, group of `CHUNK` candidates) does the same over the candidates,
   until one group is left per request. The last pass's output is already sorted. 16 nodes x
   32k tokens take 3 launches, x 152k 4.

No program holds more than `CHUNK` elements, so every row length compiles the same two kernels.
Compiled for sm_90 on this project's CPU machine, stage 1 took 0.5 s at 2,048 elements. At
8,192, 16,384 and 32,768 it took 3.9, 9.5 and 31 s: those are the chunk lengths a single
merge pass would need for long rows.

Ties go to the lowest flat index at both stages, so the result is deterministic. (PyTorch leaves
the order of equal values unspecified.) The reference is ``beam_topk_ref`` (torch.topk).

Not timed on a GPU yet, so the engine uses it only with LONGSPEC_BEAM_TOPK=triton.
`benchmarks/bench_beam_topk.py` times it. A first attempt, with one merge pass and chunks
grown to fit it, ran out of its call's time compiling a 128k vocabulary's long chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 32
CHUNK = 2048  # elements per program, at both stages


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
                        K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    flat = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = flat < row_length
    logprob = tl.load(logprobs_ptr + b * stride_lb + flat, mask=inside, other=float("-inf"))
    score = tl.load(scores_ptr + b * stride_sb + flat // vocab, mask=inside, other=0.0)
    out = (b * num_chunks + c) * K
    _extract_top_k(logprob + score, flat, inside, cand_values_ptr + out, cand_index_ptr + out,
                   row_length, K)


@triton.jit
def _merge_top_k_kernel(in_values_ptr, in_index_ptr, out_values_ptr, out_index_ptr,
                        num_candidates, num_groups, big, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    slot = g * BLOCK + tl.arange(0, BLOCK)
    inside = slot < num_candidates
    values = tl.load(in_values_ptr + b * num_candidates + slot, mask=inside,
                     other=float("-inf"))
    index = tl.load(in_index_ptr + b * num_candidates + slot, mask=inside, other=big)
    out = (b * num_groups + g) * K
    _extract_top_k(values, index, inside, out_values_ptr + out, out_index_ptr + out, big, K)


def beam_topk_supported(logprobs: torch.Tensor, k: int) -> bool:
    """Whether `beam_topk` takes this case (fp32, k <= MAX_K, the row's last dim contiguous)."""
    return (logprobs.dtype == torch.float32 and 1 <= k <= MAX_K and logprobs.dim() == 3
            and logprobs.stride(2) == 1 and logprobs.stride(1) == logprobs.shape[2])


def beam_topk(logprobs: torch.Tensor, scores: torch.Tensor, k: int, chunk: int = CHUNK
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores[b, w] + logprobs[b, w, v]`` over (w, v), per request.

    Args:
        logprobs: [B, W, V] fp32 the draft's log-probabilities at a level's W nodes
            (rows contiguous, see `beam_topk_supported`).
        scores: [B, W] fp32 the nodes' cumulative log-probabilities.
        k: how many, 1..MAX_K and <= W * V.
        chunk: elements per program (a power of two > k; tests use small ones).
    Returns:
        best [B, k] fp32 descending, index [B, k] int64 into the flattened (W * V) row
        (token = index % V, parent = index // V).
    """
    batch, nodes, vocab = logprobs.shape
    row_length = nodes * vocab
    assert beam_topk_supported(logprobs, k) and k <= row_length, (logprobs.shape, k)
    assert chunk > k and chunk & (chunk - 1) == 0, chunk
    scores = scores.float().contiguous()
    device = logprobs.device
    warps = 8 if chunk >= 2048 else 4
    groups = triton.cdiv(row_length, chunk)
    values = torch.empty(batch, groups * k, dtype=torch.float32, device=device)
    index = torch.empty(batch, groups * k, dtype=torch.int64, device=device)
    if batch == 0:
        return values[:, :k], index[:, :k]
    _chunk_top_k_kernel[(batch, groups)](
        logprobs, scores, values, index, logprobs.stride(0), scores.stride(0), row_length,
        vocab, groups, K=k, BLOCK=chunk, num_warps=warps)
    while groups > 1:  # k best of every `chunk` candidates, until one group is left
        candidates = groups * k
        groups = triton.cdiv(candidates, chunk)
        merged = torch.empty(batch, groups * k, dtype=torch.float32, device=device)
        merged_index = torch.empty(batch, groups * k, dtype=torch.int64, device=device)
        _merge_top_k_kernel[(batch, groups)](
            values, index, merged, merged_index, candidates, groups, row_length, K=k,
            BLOCK=chunk, num_warps=warps)
        values, index = merged, merged_index
    return values, index


def beam_topk_ref(logprobs: torch.Tensor, scores: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk of the same (the order of exactly equal values is unspecified there)."""
    batch = logprobs.shape[0]
    cumulative = (scores.float().unsqueeze(-1) + logprobs).reshape(batch, -1)
    return cumulative.topk(k, dim=-1)
