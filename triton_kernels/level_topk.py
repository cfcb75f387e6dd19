"""The beam tree's level expansion in two launches: the global top-k of (level nodes x
vocabulary) by cumulative log-probability.

PyTorch's top-k over chunks of the row (`engine.beam_tree.chunked_topk`) costs about 50 us per level
for 16 nodes x 32,768 tokens on an H200: a radix select, a second top-k and two bitonic sorts.
That is 0.26 ms of the drafting step's 1.81 ms at 32k (`benchmarks/results/h200-2026-12-05`,
profile). Here, for k up to 32:

1. one program per (request, group of chunks) adds the parent's score to each log-probability in
   registers, packs (score, index) into one int64 key and keeps a running top-k of its chunks with
   Triton's bitonic `tl.topk`;
2. one program per request takes the top-k of the groups' candidates, already sorted.

The packed key makes one bitonic network carry both value and index: the high 32 bits are the fp32
score's bits mapped to an order-preserving int32, the low 32 bits the complement of the flat index,
so among equal scores the lowest index wins (PyTorch leaves that order unspecified). The groups are
capped so that stage 2 sees at most one chunk of candidates. The reference is ``beam_topk_ref``
(torch.topk).

On an H100 (`benchmarks/results/h100-2026-12-05`, `bench_beam_topk`) a level of 16 nodes x 32,768
tokens takes 28.5 us against torch's 59.3 us, and a 64-node tree step at 32k 11.12 ms against 11.32
ms (`bench_step_cost --beam-topk triton,torch`). The engine uses it on CUDA by default
(`engine.beam_tree.DEFAULT_BEAM_TOPK`) after a self-check at load; LONGSPEC_BEAM_TOPK=torch keeps
torch.topk. Compiling each kernel for sm_90 takes 2-4 s.

`beam_topk_by_extraction` is the first design (repeated block-wide max, then merge passes); it is
kept for `benchmarks/bench_beam_topk.py` to time beside this one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 32
CHUNK = 2048  # elements per bitonic top-k


@triton.jit
def _pack_keys(values, index):
    """int64 keys ordered as (value descending, index ascending); NaN-free fp32 values."""
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))


@triton.jit
def _unpack_keys(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


# Integer arguments are not specialised (Triton would compile a variant for values of 1 or
# multiples of 16): the engine's self-check then compiles exactly what CUDA graphs replay.
@triton.jit(do_not_specialize=["stride_lb", "stride_sb", "row_length", "vocab", "num_groups",
                               "chunks_per_group"])
def _group_top_k_kernel(logprobs_ptr, scores_ptr, cand_ptr, stride_lb, stride_sb, row_length,
                        vocab, num_groups, chunks_per_group,
                        KP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    running = tl.full([KP], -2**63, tl.int64)
    for i in range(chunks_per_group):
        flat = (g * chunks_per_group + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = flat < row_length
        logprob = tl.load(logprobs_ptr + b * stride_lb + flat, mask=inside, other=0.0)
        score = tl.load(scores_ptr + b * stride_sb + flat // vocab, mask=inside, other=0.0)
        keys = tl.where(inside, _pack_keys(logprob + score, flat), -2**63)
        both = tl.reshape(tl.join(running, tl.topk(keys, KP)), [2 * KP])
        running = tl.topk(both, KP)
    tl.store(cand_ptr + (b * num_groups + g) * KP + tl.arange(0, KP), running)


@triton.jit(do_not_specialize=["num_candidates", "k"])
def _final_top_k_kernel(cand_ptr, best_ptr, index_ptr, num_candidates, k,
                        KP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.arange(0, BLOCK)
    keys = tl.load(cand_ptr + b * num_candidates + slot, mask=slot < num_candidates,
                   other=-2**63)
    best, index = _unpack_keys(tl.topk(keys, KP))  # sorted, best first
    out = tl.arange(0, KP)
    tl.store(best_ptr + b * k + out, best, mask=out < k)
    tl.store(index_ptr + b * k + out, index, mask=out < k)


def beam_topk_supported(logprobs: torch.Tensor, k: int) -> bool:
    """Whether `beam_topk` takes this case (fp32, k <= MAX_K, the row's last dim contiguous,
    flat indices below 2**32)."""
    return (logprobs.dtype == torch.float32 and 1 <= k <= MAX_K and logprobs.dim() == 3
            and logprobs.stride(2) == 1 and logprobs.stride(1) == logprobs.shape[2]
            and logprobs.shape[1] * logprobs.shape[2] < 2**32)


def padded_k(k: int) -> int:
    """The power of two `beam_topk` selects for k (then keeps the first k)."""
    return max(2, triton.next_power_of_2(k))


def beam_topk(logprobs: torch.Tensor, scores: torch.Tensor, k: int, chunk: int = CHUNK
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``scores[b, w] + logprobs[b, w, v]`` over (w, v), per request.

    Args:
        logprobs: [B, W, V] fp32 the draft's log-probabilities at a level's W nodes
            (rows contiguous, see `beam_topk_supported`); no NaN.
        scores: [B, W] fp32 the nodes' cumulative log-probabilities.
        k: how many, 1..MAX_K and <= W * V.
        chunk: elements per bitonic top-k (a power of two >= 2 * k; tests use small ones).
    Returns:
        best [B, k] fp32 descending, index [B, k] int64 into the flattened (W * V) row
        (token = index % V, parent = index // V); ties go to the lowest index.
    """
    batch, nodes, vocab = logprobs.shape
    row_length = nodes * vocab
    assert beam_topk_supported(logprobs, k) and k <= row_length, (logprobs.shape, k)
    kp = padded_k(k)  # tl.topk takes powers of two
    assert chunk >= 2 * kp and chunk & (chunk - 1) == 0, (chunk, k)
    scores = scores.float().contiguous()
    device = logprobs.device
    best = torch.empty(batch, k, dtype=torch.float32, device=device)
    index = torch.empty(batch, k, dtype=torch.int64, device=device)
    if batch == 0:
        return best, index
    chunks = triton.cdiv(row_length, chunk)
    groups = min(chunks, chunk // kp)  # stage 2 reads at most one chunk of candidates
    chunks_per_group = triton.cdiv(chunks, groups)
    groups = triton.cdiv(chunks, chunks_per_group)
    warps = 8 if chunk >= 2048 else 4
    candidates = torch.empty(batch, groups * kp, dtype=torch.int64, device=device)
    _group_top_k_kernel[(batch, groups)](
        logprobs, scores, candidates, logprobs.stride(0), scores.stride(0), row_length, vocab,
        groups, chunks_per_group, KP=kp, BLOCK=chunk, num_warps=warps)
    _final_top_k_kernel[(batch,)](
        candidates, best, index, groups * kp, k, KP=kp, BLOCK=chunk, num_warps=warps)
    return best, index


# The first design, timed beside `beam_topk` by benchmarks/bench_beam_topk.py.

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


def beam_topk_by_extraction(logprobs: torch.Tensor, scores: torch.Tensor, k: int,
                            chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`beam_topk` by repeated block-wide max per chunk of `chunk` elements, then merge passes
    over the candidates until one group is left (the first design, for the benchmark).

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
