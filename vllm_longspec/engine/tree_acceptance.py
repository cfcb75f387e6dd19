"""Lossless acceptance of a token tree against the target's distributions at its nodes.

Greedy requests: from the root, follow the child whose token is the target's argmax at the
current node; stop at the first node without such a child and emit the argmax there (the bonus
token). The output is exactly what greedy decoding without speculation produces.

Sampled requests (the children of a node are *deterministic* candidates, the draft's top-k, not
samples from the draft): at a node with target distribution p and candidate children
c_1, ..., c_m (distinct tokens, best first),

    for k = 1..m:  accept c_k with probability  p(c_k) / (1 - p(c_1) - ... - p(c_{k-1}))
    if none is accepted: sample from p with c_1..c_m removed (renormalised)

P(emit c_k) = p(c_k) (the rejection factors telescope) and P(emit t) = p(t) for every other t,
so each emitted token follows the target's distribution exactly, and the walk continues at the
accepted child with the target's next distribution. The reference implementation's rule (which
reads probabilities by node instead of token and treats top-k children as draft samples) is
not lossless; this one is.

The target distribution p is vLLM's own: ``apply_sampling_constraints`` (temperature, top-k,
top-p) on the node's logits, as vLLM's rejection sampler uses for chains. Requests with
penalties, bad words, logit bias, allowed tokens, min-p, min_tokens, logprobs or structured
output never get trees (see `tree_eligible`), so nothing else shapes p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .verification import TreeVerificationPlan


@dataclass
class TreeAcceptance:
    """One row's result: ``tokens`` = accepted path tokens + the bonus token; ``nodes`` = the
    accepted path's node indices (root excluded), ``len(nodes) == len(tokens) - 1``."""

    tokens: list[int]
    nodes: list[int]


def children_of(parents: np.ndarray) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        kids[int(parents[node])].append(node)
    return kids


def accept_greedy(target_argmax: np.ndarray, tokens: np.ndarray,
                  parents: np.ndarray) -> TreeAcceptance:
    """Args: target_argmax [n] the target's argmax at each node; tokens [n] node tokens (the
    root's included); parents [n]."""
    kids = children_of(parents)
    node, path, out = 0, [], []
    while True:
        best = int(target_argmax[node])
        out.append(best)
        nxt = next((c for c in kids[node] if int(tokens[c]) == best), None)
        if nxt is None:
            return TreeAcceptance(out, path)
        path.append(nxt)
        node = nxt


def accept_sampled(probs: torch.Tensor, tokens: np.ndarray, parents: np.ndarray,
                   generator: torch.Generator | None) -> TreeAcceptance:
    """Args: probs [n, V] the target's (processed) distribution at each node; tokens, parents
    as in `accept_greedy`; generator: the request's own (seeded requests) or None."""
    kids = children_of(parents)
    device = probs.device
    node, path, out = 0, [], []
    while True:
        p = probs[node]
        children = kids[node]
        if children:
            cand = torch.tensor([int(tokens[c]) for c in children], device=device)
            cand_p = p[cand].double().tolist()
            uniform = torch.rand(len(children), generator=generator, device=device,
                                 dtype=torch.float64).tolist()
            remaining = 1.0
            accepted = None
            for child, pc, u in zip(children, cand_p, uniform):
                if remaining > 0 and u * remaining < pc:
                    accepted = child
                    break
                remaining -= pc
            if accepted is not None:
                out.append(int(tokens[accepted]))
                path.append(accepted)
                node = accepted
                continue
            residual = p.clone()
            residual[cand] = 0
            if float(residual.sum()) <= 0.0:  # all mass on rejected candidates: rounding only
                residual = p
        else:
            residual = p
        out.append(int(torch.multinomial(residual.float(), 1, generator=generator).item()))
        return TreeAcceptance(out, path)


def accept_trees(logits: torch.Tensor, plan: TreeVerificationPlan, sampling_metadata: Any,
                 num_batch_rows: int,
                 process_logits: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                 ) -> list[TreeAcceptance]:
    """Accepts a path of every tree in the plan.

    Args:
        logits: [num_logits, V] the step's target logits (``num_draft + 1`` rows per request,
            batch order).
        sampling_metadata: vLLM's ``SamplingMetadata`` of the batch.
        num_batch_rows: requests in the batch.
        process_logits: vLLM's ``apply_sampling_constraints(logits, cu_num_tokens, metadata)``.
    """
    rows = plan.rows.tolist()
    sizes = [len(p) for p in plan.parents_cpu]
    temperature = sampling_metadata.temperature
    if sampling_metadata.all_greedy or temperature is None:
        greedy = [True] * len(rows)
    else:
        temps = temperature.tolist()
        greedy = [temps[r] == 0 for r in rows]
    gather = torch.cat([torch.arange(s, s + n) for s, n in zip(plan.logits_start, sizes)])
    gather = gather.to(logits.device)
    tree_logits = logits[gather]
    results: list[TreeAcceptance | None] = [None] * len(rows)
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    if any(greedy):
        argmax = tree_logits.argmax(dim=-1).cpu().numpy()
        for j, is_greedy in enumerate(greedy):
            if is_greedy:
                results[j] = accept_greedy(argmax[offsets[j]:offsets[j + 1]],
                                           plan.tokens_cpu[j], plan.parents_cpu[j])
    if not all(greedy):
        counts = np.zeros(num_batch_rows, dtype=np.int64)
        for j, row in enumerate(rows):
            if not greedy[j]:
                counts[row] = sizes[j]
        pick = torch.cat([torch.arange(offsets[j], offsets[j + 1])
                          for j in range(len(rows)) if not greedy[j]]).to(logits.device)
        cu = torch.from_numpy(np.cumsum(counts).astype(np.int32)).to(logits.device)
        processed = process_logits(tree_logits[pick].float().clone(), cu, sampling_metadata)
        probs = processed.softmax(dim=-1, dtype=torch.float32)
        start = 0
        generators = sampling_metadata.generators or {}
        for j, row in enumerate(rows):
            if greedy[j]:
                continue
            n = sizes[j]
            results[j] = accept_sampled(probs[start:start + n], plan.tokens_cpu[j],
                                        plan.parents_cpu[j], generators.get(row))
            start += n
    return results  # type: ignore[return-value]


def compaction_slots(plan: TreeVerificationPlan, slots: torch.Tensor,
                     results: list[TreeAcceptance]) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) cache slots that move each accepted path next to its root.

    Args:
        slots: [T] cache slot of each tree token (``plan.token_index`` order).
    """
    offsets = plan.cu_seqlens.tolist()
    src, dst = [], []
    for j, result in enumerate(results):
        for depth, node in enumerate(result.nodes, start=1):
            if node != depth:
                src.append(offsets[j] + node)
                dst.append(offsets[j] + depth)
    if not src:
        empty = torch.empty(0, dtype=torch.int64, device=slots.device)
        return empty, empty
    src_t = torch.tensor(src, device=slots.device)
    dst_t = torch.tensor(dst, device=slots.device)
    return slots[src_t].long(), slots[dst_t].long()
