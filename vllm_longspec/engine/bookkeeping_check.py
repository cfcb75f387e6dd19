"""Whether the one-launch tree bookkeeping kernels can replace their torch versions here.

`TreeSlots` asks once, on CUDA, before its first step. The kernels are held to the torch versions
under Triton's interpreter in CI (`tests/kernels/test_tree_bookkeeping.py`); this guards a GPU, a
compiler or a Triton version they have not met: a kernel that fails to compile or disagrees is not
used, and the engine runs the torch versions (with a warning).
"""

from __future__ import annotations

import logging

import torch

from .beam_tree import tree_node_offsets
from .tree_device import accept_greedy_device
from .v2_tree import TreeSlots

logger = logging.getLogger("vllm.longspec")


def random_beam_parents(gen: torch.Generator, batch: int, widths: tuple[int, ...]
                        ) -> torch.Tensor:
    """[B, N] int64 BFS parents of beam trees: each level's nodes hang off random nodes of the
    level above (in any order, as a beam's best-first children do)."""
    offsets = tree_node_offsets(tuple(widths))
    parents = torch.full((batch, offsets[-1]), -1, dtype=torch.long)
    for level, width in enumerate(widths):
        above = 0 if level == 0 else offsets[level - 1]  # the level above is [above, first)
        first = offsets[level]
        parents[:, first:first + width] = torch.randint(above, first, (batch, width),
                                                        generator=gen)
    return parents


def fused_bookkeeping_works(widths: tuple[int, ...], device: torch.device) -> bool:
    """Whether `tree_bookkeeping`'s kernels compile on `device` and equal the torch versions:
    one small batch (a tree row, a chain row, a trimmed tree) through both."""
    try:
        with torch.device("cpu"):  # the case is built on the host, whatever the default device
            return _kernels_agree(widths, device)
    except Exception as error:  # noqa: BLE001 -- any failure means: use the torch versions
        logger.warning("LongSpec: one-launch tree bookkeeping unavailable (%r); using the "
                       "torch versions", error)
        return False


def _kernels_agree(widths: tuple[int, ...], device: torch.device) -> bool:
    from vllm_longspec_kernels.tree_bookkeeping import accept_greedy_trees, record_trees

    gen = torch.Generator().manual_seed(0)
    torch_slots = TreeSlots(3, widths, torch.device("cpu"))
    kernel_slots = TreeSlots(3, widths, torch.device("cpu"))
    n, batch = torch_slots.num_nodes, 3
    parents = random_beam_parents(gen, batch, widths)
    drafted = torch.randint(0, 2, (batch, n - 1), generator=gen)
    slots = torch.tensor([2, 0, 1])
    tree_ok = torch.tensor([True, False, True])
    expected = torch_slots.record(slots, drafted, parents, tree_ok)
    on = {name: getattr(kernel_slots, name).to(device) for name in
          ("parents", "masks", "position_shift", "chain_masks", "tree_shift")}
    got = record_trees(slots.to(device), drafted.to(device), parents.to(device),
                       tree_ok.to(device), on["parents"], on["masks"], on["position_shift"],
                       on["chain_masks"], on["tree_shift"], torch_slots.depth,
                       torch_slots.first_leaf)
    same = (torch.equal(got.cpu(), expected)
            and torch.equal(on["parents"].cpu(), torch_slots.parents)
            and torch.equal(on["masks"].cpu(), torch_slots.masks)
            and torch.equal(on["position_shift"].cpu(), torch_slots.position_shift))
    tokens = torch.cat([torch.zeros(batch, 1, dtype=torch.long), expected], dim=1)
    valid = torch.arange(n).unsqueeze(0) < torch.tensor([[n], [n], [n // 2 + 1]])
    logits_rows = torch.arange(batch * n).view(batch, n)
    argmax = torch.randint(0, 2, (batch * n,), generator=gen)
    reference = accept_greedy_device(torch_slots.rows(slots, tokens, valid, logits_rows),
                                     argmax)
    out, num_sampled, path = accept_greedy_trees(
        slots.to(device), on["parents"], tokens.to(device), valid.to(device),
        logits_rows.to(device), argmax.to(device))
    same = same and (torch.equal(out.cpu(), reference.tokens)
                     and torch.equal(num_sampled.cpu(), reference.num_sampled)
                     and torch.equal(path.cpu(), reference.path))
    if not same:
        logger.warning("LongSpec: one-launch tree bookkeeping disagrees with the torch "
                       "versions on %s; using the torch versions", device)
    else:
        logger.info("LongSpec: one-launch tree bookkeeping on %s (self-check passed)", device)
    return same

