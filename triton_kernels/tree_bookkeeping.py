"""One-launch token-tree bookkeeping for Model Runner V2: recording drafted trees, greedy
acceptance.

Both replace a few dozen small torch kernels each (59 and 43 operators for a 64-node tree), whose
launches the host issues every step while the GPU waits: a tree step at 32k left the GPU idle for
about 2 ms of 9.9 (`benchmarks/results/h200-2026-12-04c`). One program per request row does all of
it in registers, walking the trees' parent links.

Trees are BFS-ordered, the root (the last committed token) at node 0, ``parents[i] < i``. A row
that verifies no tree holds a chain over the same nodes (`TreeSlots`), up to N-1 deep. The
pure-torch references are ``vllm_longspec.engine.v2_tree``'s ``TreeSlots.record`` and
``vllm_longspec.engine.tree_device.accept_greedy_device``; the tests hold each kernel to its
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _record_trees_kernel(
    slots_ptr, tokens_ptr, parents_ptr, ok_ptr,
    rec_parents_ptr, rec_masks_ptr, rec_shift_ptr, out_tokens_ptr,
    chain_masks_ptr, tree_shift_ptr,
    stride_tb, stride_pb, stride_rp, stride_rm, stride_rs, stride_ob,
    N: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, BLOCK_W: tl.constexpr,
    DEPTH: tl.constexpr, FIRST_LEAF: tl.constexpr,
):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    tree_ok = tl.load(ok_ptr + b) != 0
    nodes = tl.arange(0, BLOCK_N)
    in_tree = nodes < N
    words = tl.arange(0, BLOCK_W)
    word_ok = words < WORDS
    parents = tl.load(parents_ptr + b * stride_pb + nodes, mask=in_tree, other=-1)

    # Ancestor bitmasks: node i, its parent, ... (bit j % 32 of word j // 32 for ancestor j).
    masks = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    cur = tl.where(in_tree, nodes, -1).to(tl.int64)
    for _ in tl.static_range(DEPTH + 1):
        live = cur >= 0
        safe = tl.where(live, cur, 0)
        bit = tl.full([BLOCK_N], 1, tl.int32) << (safe % 32).to(tl.int32)
        hit = live[:, None] & ((safe // 32)[:, None] == words[None, :])
        masks = masks | tl.where(hit, bit[:, None], 0)
        cur = tl.load(parents_ptr + b * stride_pb + safe, mask=live, other=-1)

    # The best path (root to the first deepest node) as a chain: its tokens, then the last one
    # repeated, for rows that verify no tree.
    chain_tokens = tl.zeros([BLOCK_N], dtype=tl.int64)
    node = FIRST_LEAF
    for step in tl.static_range(DEPTH):
        depth = DEPTH - step
        token = tl.load(tokens_ptr + b * stride_tb + node - 1)
        if depth == DEPTH:
            chain_tokens = tl.where(nodes >= DEPTH - 1, token, chain_tokens)
        else:
            chain_tokens = tl.where(nodes == depth - 1, token, chain_tokens)
        node = tl.maximum(tl.load(parents_ptr + b * stride_pb + node), 0)

    tl.store(rec_parents_ptr + slot * stride_rp + nodes, tl.where(tree_ok, parents, nodes - 1),
             mask=in_tree)
    tile = in_tree[:, None] & word_ok[None, :]
    chain = tl.load(chain_masks_ptr + nodes[:, None] * WORDS + words[None, :], mask=tile, other=0)
    tl.store(rec_masks_ptr + slot * stride_rm + nodes[:, None] * WORDS + words[None, :],
             tl.where(tree_ok, masks, chain), mask=tile)
    shift = tl.load(tree_shift_ptr + nodes, mask=in_tree, other=0)
    tl.store(rec_shift_ptr + slot * stride_rs + nodes, tl.where(tree_ok, shift, 0), mask=in_tree)
    drafted = nodes < N - 1
    tokens = tl.load(tokens_ptr + b * stride_tb + nodes, mask=drafted, other=0)
    tl.store(out_tokens_ptr + b * stride_ob + nodes, tl.where(tree_ok, tokens, chain_tokens),
             mask=drafted)


def record_trees(slots: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                 tree_ok: torch.Tensor, rec_parents: torch.Tensor, rec_masks: torch.Tensor,
                 rec_shift: torch.Tensor, chain_masks: torch.Tensor, tree_shift: torch.Tensor,
                 depth: int, first_leaf: int) -> torch.Tensor:
    """Records each request's tree in its slot's rows, in one launch.

    Args:
        slots: [B] int64 request slots (distinct).
        tokens: [B, N-1] int64 drafted nodes (BFS, root excluded).
        parents: [B, N] int64 their parents (root -1).
        tree_ok: [B] bool rows that verify the tree; the others verify its best path as a chain.
        rec_parents: [S, N] int64, written at the slots' rows (chain rows: -1, 0, 1, ...).
        rec_masks: [S, N, W] int32 packed ancestor masks (chain rows: `chain_masks`).
        rec_shift: [S, N] int64 position shifts (chain rows: 0).
        chain_masks: [N, W] int32 the chain's packed masks.
        tree_shift: [N] int64 ``i - depth(i)``.
        depth: the trees' depth; first_leaf: BFS index of the deepest level's first node.
    Returns:
        [B, N-1] int64 the draft tokens to schedule (chain rows: the best path, then filler).
    """
    batch, n = parents.shape
    words = rec_masks.shape[-1]
    out = torch.empty(batch, n - 1, dtype=tokens.dtype, device=tokens.device)
    if batch == 0:
        return out
    assert tokens.stride(1) == 1 and parents.stride(1) == 1 and rec_parents.stride(1) == 1
    assert rec_masks.stride(2) == 1 and rec_masks.stride(1) == words
    assert chain_masks.is_contiguous() and tree_shift.is_contiguous()
    _record_trees_kernel[(batch,)](
        slots, tokens, parents, tree_ok.view(torch.uint8),
        rec_parents, rec_masks, rec_shift, out, chain_masks, tree_shift,
        tokens.stride(0), parents.stride(0), rec_parents.stride(0), rec_masks.stride(0),
        rec_shift.stride(0), out.stride(0),
        N=n, BLOCK_N=triton.next_power_of_2(n), WORDS=words,
        BLOCK_W=triton.next_power_of_2(words), DEPTH=depth, FIRST_LEAF=first_leaf,
        num_warps=4 if n > 64 else 2)
    return out


@triton.jit
def _accept_greedy_kernel(
    slots_ptr, rec_parents_ptr, tokens_ptr, valid_ptr, logits_rows_ptr, argmax_ptr,
    out_tokens_ptr, num_sampled_ptr, path_ptr,
    stride_rp, stride_tr, stride_vr, stride_lr, stride_or, stride_pr,
    N: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    parents_row = rec_parents_ptr + tl.load(slots_ptr + r).to(tl.int64) * stride_rp
    nodes = tl.arange(0, BLOCK_N)
    in_row = nodes < N

    # Node i is accepted when it and every ancestor below the root is valid and is the
    # target's argmax at its parent. (Walked until every node reached the root: a chain row's
    # path may be N-1 deep.)
    accepted = in_row
    depth = tl.zeros([BLOCK_N], dtype=tl.int64)
    cur = tl.where(in_row, nodes, 0).to(tl.int64)
    while tl.max(cur, axis=0) > 0:
        live = cur > 0
        parent = tl.maximum(tl.load(parents_row + cur, mask=live, other=0), 0)
        token = tl.load(tokens_ptr + r * stride_tr + cur, mask=live, other=-1)
        valid = tl.load(valid_ptr + r * stride_vr + cur, mask=live, other=0) != 0
        row = tl.load(logits_rows_ptr + r * stride_lr + parent, mask=live, other=0)
        best = tl.load(argmax_ptr + row, mask=live, other=-2)
        accepted = accepted & (~live | (valid & (token == best)))
        depth += live.to(tl.int64)
        cur = tl.where(live, parent, 0)

    # The deepest accepted node, the first in BFS order among equals.
    key = tl.where(accepted, depth * (N + 1) + (N - nodes), -1)
    best_key = tl.max(key, axis=0)
    leaf_depth = best_key // (N + 1)
    leaf = N - best_key % (N + 1)
    bonus = tl.load(argmax_ptr + tl.load(logits_rows_ptr + r * stride_lr + leaf))

    path = tl.full([BLOCK_N], -1, dtype=tl.int64)
    out = tl.where(nodes == leaf_depth, bonus, -1)
    node = leaf
    for step in range(0, leaf_depth + 1):
        d = leaf_depth - step
        path = tl.where(nodes == d, node, path)
        token = tl.load(tokens_ptr + r * stride_tr + node)
        out = tl.where((nodes == d - 1) & (d >= 1), token, out)
        node = tl.maximum(tl.load(parents_row + node), 0)
    tl.store(out_tokens_ptr + r * stride_or + nodes, out, mask=in_row)
    tl.store(path_ptr + r * stride_pr + nodes, path, mask=in_row)
    tl.store(num_sampled_ptr + r, leaf_depth + 1)


def accept_greedy_trees(slots: torch.Tensor, rec_parents: torch.Tensor, tokens: torch.Tensor,
                        valid: torch.Tensor, logits_rows: torch.Tensor, argmax: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree acceptance of R rows in one launch (`accept_greedy_device`'s rule: the
    longest path whose every token is the target's argmax at its parent, the first in BFS order
    among equally long ones; then the argmax at its end).

    Args:
        slots: [R] int64 the rows' request slots; rec_parents: [S, N] int64 their trees' parents.
        tokens: [R, N] int64 node tokens (node 0: the root).
        valid: [R, N] bool the nodes verified this step (a BFS prefix).
        logits_rows: [R, N] int64 each node's row in `argmax`.
        argmax: [L] int64 the target's argmax at every logits row of the step.
    Returns:
        tokens [R, N] int64 (the path's tokens, then the bonus token, then -1), num_sampled [R]
        int64 (accepted drafts + 1), path [R, N] int64 (the node at each depth, -1 past it).
    """
    rows, n = tokens.shape
    out = torch.empty(rows, n, dtype=torch.int64, device=tokens.device)
    path = torch.empty_like(out)
    num_sampled = torch.empty(rows, dtype=torch.int64, device=tokens.device)
    if rows == 0:
        return out, num_sampled, path
    for t in (rec_parents, tokens, valid, logits_rows):
        assert t.stride(1) == 1
    _accept_greedy_kernel[(rows,)](
        slots, rec_parents, tokens, valid.view(torch.uint8), logits_rows, argmax,
        out, num_sampled, path,
        rec_parents.stride(0), tokens.stride(0), valid.stride(0), logits_rows.stride(0),
        out.stride(0), path.stride(0),
        N=n, BLOCK_N=triton.next_power_of_2(n), num_warps=4 if n > 64 else 2)
    return out, num_sampled, path
