"""The draft's logits head: the target's ``lm_head``, vocabulary-parallel under TP.

The next level of a token tree is the global top-w of (level nodes x vocabulary) by cumulative
log-probability (`beam_tree.expand_level`). On one rank that is computed on full logits. Under
tensor parallelism each rank holds a vocabulary shard of the lm_head (vLLM's
``ParallelLMHead``): it normalises its logits with the all-gathered log-partitions ([N, 1] per
rank), picks its own best w candidates, and the candidates -- not the logits -- are all-gathered
([B, w] per rank); every rank then keeps the same best w, so all ranks build identical trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..draft.sharding import TPComm
from .beam_tree import LevelExpansion, expand_level


@dataclass(frozen=True)
class VocabShard:
    """The rank's part of the lm_head: global ids ``[start, start + size)`` are its first `size`
    logit columns (columns past `size` are padding); `vocab_size` is the whole (unpadded)
    vocabulary."""

    start: int
    size: int
    vocab_size: int


class DraftVocabHead:
    """Log-probabilities of draft hidden states and the expansion of a tree level.

    Args:
        local_logits: [N, hidden] -> [N, >= shard.size] this rank's logits (all of the
            vocabulary when `comm` is None or has one rank).
        shard: which global ids those columns are.
        comm: the TP group (None: a single rank).
        token_ids: [N] the vocabulary ids of the logit columns when the head covers a pruned
            vocabulary (`draft.vocab`); None: column i is id i. Single rank only.
    """

    def __init__(self, local_logits: Callable[[torch.Tensor], torch.Tensor], shard: VocabShard,
                 comm: TPComm | None = None, token_ids: torch.Tensor | None = None):
        self.local_logits = local_logits
        self.shard = shard
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        if token_ids is not None and self.comm is not None:
            raise ValueError("a pruned draft vocabulary is not supported under tensor "
                             "parallelism")
        self.token_ids = token_ids

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, shard.size] fp32 log-probabilities of this rank's ids, normalised
        over the whole vocabulary."""
        logits = self.local_logits(hidden)[:, :self.shard.size]
        if self.comm is None:  # one kernel: the fp32 cast happens inside the softmax
            return torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        logits = logits.float()
        log_z = torch.logsumexp(logits, dim=-1, keepdim=True)                       # [N, 1]
        log_z = torch.logsumexp(self.comm.all_gather(log_z, dim=-1), dim=-1, keepdim=True)
        return logits - log_z

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N] int64 the draft's most likely token (a chain's next node), from
        the raw logits: no softmax, no fp32 copy of the vocabulary-sized logits."""
        if self.comm is not None:
            zeros = hidden.new_zeros(hidden.shape[0], 1, dtype=torch.float32)
            return self.expand_level(hidden, zeros, 1).tokens[:, 0]
        best = self.local_logits(hidden)[:, :self.shard.size].argmax(dim=-1)
        return best if self.token_ids is None else self.token_ids[best]

    def expand_level(self, hidden: torch.Tensor, scores: torch.Tensor,
                     width: int) -> LevelExpansion:
        """Global top-`width` children of a level, identical on every rank.

        Args:
            hidden: [B*W, hidden] draft outputs at the level's nodes, request-major.
            scores: [B, W] the nodes' cumulative log-probabilities.
        Returns:
            [B, w] tokens (global ids), parents (index within the level), scores, best first;
            w = min(width, W * vocab_size).
        """
        batch, nodes = scores.shape
        logprobs = self.log_probs(hidden).reshape(batch, nodes, -1)
        local = expand_level(logprobs, scores, width)
        if self.comm is None:
            if self.token_ids is not None:
                return LevelExpansion(tokens=self.token_ids[local.tokens],
                                      parent_local=local.parent_local, scores=local.scores)
            return local
        best, parent = local.scores, local.parent_local
        tokens = local.tokens + self.shard.start
        short = width - best.shape[1]
        if short > 0:  # a shard with fewer than `width` candidates: pad with impossible ones
            best = torch.cat([best, best.new_full((batch, short), float("-inf"))], dim=1)
            tokens = torch.cat([tokens, tokens.new_zeros(batch, short)], dim=1)
            parent = torch.cat([parent, parent.new_zeros(batch, short)], dim=1)
        # Token ids (< 2^24) and parents are exact in float32: one collective for all three.
        packed = torch.stack([best.float(), tokens.float(), parent.float()], dim=-1)
        gathered = self.comm.all_gather(packed.reshape(batch, width * 3), dim=-1)
        gathered = gathered.reshape(batch, -1, 3)                    # [B, T*width, 3]
        top, index = gathered[..., 0].topk(min(width, nodes * self.shard.vocab_size), dim=-1)
        chosen = gathered.gather(1, index.unsqueeze(-1).expand(-1, -1, 3))
        return LevelExpansion(tokens=chosen[..., 1].long(), parent_local=chosen[..., 2].long(),
                              scores=top)
