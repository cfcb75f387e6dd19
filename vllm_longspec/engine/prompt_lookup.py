"""Prompt lookup beside the draft: continuations copied from a request's own history.

Long-context requests repeat themselves: code completion re-uses identifiers and whole lines of
the repository in the prompt, summaries quote the document. Where the last n committed tokens
occurred before, the tokens that followed them there are a draft that costs no model forward
(vLLM's ``ngram`` method drafts only this way). LongSpec keeps its draft for everything else:
with ``prompt_lookup_max > 0`` a chain request whose history has a match drafts the copied
continuation instead of the draft model's tokens, position by position, as far as the copy
reaches. Verification is unchanged, so the output is too (drafts are point masses either way).

`lookup_continuations` runs on device tensors with static shapes and no host syncs, so it sits
inside the drafting CUDA graphs of Model Runner V2; the V1 proposer calls it on host tensors.
"""

from __future__ import annotations

import torch


def lookup_continuations(history: torch.Tensor, lengths: torch.Tensor, num_tokens: int,
                         min_ngram: int, max_ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The continuation of each request's longest recent suffix match in its own history.

    For n from ``max_ngram`` down to ``min_ngram``: the last n committed tokens are searched for
    in the history before them; the latest occurrence of the longest n that occurs wins, and
    the tokens after it are the continuation (only committed tokens are copied).

    Args:
        history: [B, L] integer token ids; row b's first ``lengths[b]`` entries are committed,
            the rest is ignored (stale ids of an earlier request are harmless).
        lengths: [B] int64 committed tokens per request (clamped to L: a longer one is
            searched in its first L tokens).
        num_tokens: K, the continuation length wanted.
        min_ngram, max_ngram: suffix lengths tried, 1 <= min_ngram <= max_ngram.
    Returns:
        tokens: [B, K] int64 the copied continuation (0 where not valid).
        valid: [B, K] bool, True where ``tokens`` holds a copied committed token.
    """
    batch, width = history.shape
    device = history.device
    lengths = lengths.long().clamp(max=width)
    # One pass over candidate match ends e (exclusive; the continuation starts at e): the match
    # length at e is how many of history[e-1], history[e-2], ... equal the last committed
    # tokens, counted with a running AND over k < max_ngram. That is 4 elementwise kernels
    # over [B, L] per suffix position where a pass per n took ~2n (~max_ngram^2 in all), and
    # inside the drafting CUDA graphs every kernel costs a launch slot.
    ends = torch.arange(1, width + 1, dtype=torch.int32, device=device)          # [L] = e
    suffix_at = lengths.unsqueeze(1) - 1 - torch.arange(max_ngram, device=device)  # [B, n]
    # Token ids are >= 0: a suffix position before the start (-2) never equals a history
    # position before the start (-1) or any token.
    suffix = torch.where(suffix_at >= 0, history.gather(1, suffix_at.clamp(min=0)), -2)
    running = torch.ones(batch, width, dtype=torch.bool, device=device)
    match_len = torch.zeros(batch, width, dtype=torch.int32, device=device)
    for k in range(min(max_ngram, width - 1)):
        # history[e-1-k] for every e (k leading positions have nothing there: no match).
        shifted = history if k == 0 else torch.nn.functional.pad(
            history[:, :width - k], (k, 0), value=-1)
        running &= shifted == suffix[:, k:k + 1]
        match_len += running
    # The match must end before the last committed token (something follows it); its suffix
    # must be at least min_ngram long. Longest (capped at max_ngram) first, then latest.
    usable = (ends.unsqueeze(0) <= lengths.unsqueeze(1) - 1) & (match_len >= min_ngram)
    score = torch.where(usable, match_len * (width + 1) + ends.unsqueeze(0), -1)
    best = score.max(dim=1).values.long()                                        # [B]
    best_end = torch.where(best >= 0, best % (width + 1), -1)
    index = best_end.unsqueeze(1) + torch.arange(num_tokens, device=device)   # [B, K]
    valid = (best_end.unsqueeze(1) >= 0) & (index < lengths.unsqueeze(1))
    tokens = history.gather(1, index.clamp(min=0, max=width - 1)).long()
    return torch.where(valid, tokens, 0), valid


def lookup_continuations_ref(history: list[list[int]], lengths: list[int], num_tokens: int,
                             min_ngram: int, max_ngram: int) -> list[list[int | None]]:
    """Plain-Python reference of `lookup_continuations` (None = not valid)."""
    out = []
    for row, n_b in zip(history, lengths):
        seq = row[:n_b]
        found: list[int | None] = [None] * num_tokens
        for n in range(max_ngram, min_ngram - 1, -1):
            if n_b < n:
                continue
            suffix = seq[n_b - n:]
            ends = [s + n for s in range(0, n_b - n) if s + n <= n_b - 1 and seq[s:s + n] == suffix]
            if ends:
                end = max(ends)
                found = [seq[end + j] if end + j < n_b else None for j in range(num_tokens)]
                break
        out.append(found)
    return out
