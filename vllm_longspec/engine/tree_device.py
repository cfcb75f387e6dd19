"""Token-tree bookkeeping and lossless tree acceptance on device tensors, without host syncs.

What Model Runner V2 needs to verify LongSpec trees asynchronously (`v2_tree`): every function
here takes and returns device tensors of static shapes, launches a fixed number of kernels and
never reads a value back to the host. The host reference of the acceptance rules is
`tree_acceptance` (V1 runner); the tests hold the two to the same results.

Trees are BFS-ordered with the root (the last committed token) at node 0 and
``parents[i] < i``; a row may verify only a BFS prefix of its tree (``valid``), which is a tree
itself.

Randomness (sampled requests) comes from a counter-based hash of (the request's seed, the
root's position, what is drawn), so a seeded request draws the same numbers whatever the batch
and nothing depends on a generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_SALT_ACCEPT = 0x6A09E667
_SALT_RESAMPLE = 0x3C6EF372


# --------------------------------------------------------------------------- tree shape
def ancestor_matrix(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """``anc[b, i, j]``: node j is node i or one of its ancestors.

    Args:
        parents: [B, N] int64, root -1, ``parents[:, i] < i``.
        max_depth: an upper bound of the trees' depth (``max_depth`` gather rounds).
    Returns:
        [B, N, N] bool.
    """
    batch, n = parents.shape
    eye = torch.eye(n, dtype=torch.bool, device=parents.device).expand(batch, n, n)
    index = parents.clamp(min=0).unsqueeze(-1).expand(batch, n, n)
    has_parent = (parents >= 0).unsqueeze(-1)
    anc = eye
    for _ in range(max_depth):
        anc = eye | (has_parent & anc.gather(1, index))
    return anc


def pack_masks(anc: torch.Tensor, num_words: int) -> torch.Tensor:
    """Packs ancestor matrices into ``tree_attention``'s bitmask format.

    Args:
        anc: [B, N, N] bool (`ancestor_matrix`).
        num_words: int32 words per row (>= ceil(N / 32)).
    Returns:
        [B, N, num_words] int32: bit ``j % 32`` of word ``j // 32`` of row i is ``anc[i, j]``.
    """
    batch, n, _ = anc.shape
    bits = torch.zeros(batch, n, 32 * num_words, dtype=torch.int64, device=anc.device)
    bits[:, :, :n] = anc.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=anc.device),
        torch.arange(32, device=anc.device))
    words = (bits.view(batch, n, num_words, 32) * weights).sum(-1)  # [0, 2^32)
    # int32 two's complement of the unsigned word
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def chain_masks(n: int, num_words: int, device: torch.device) -> torch.Tensor:
    """Packed masks of a chain of n nodes: [n, num_words] int32."""
    parents = torch.arange(-1, n - 1, device=device).unsqueeze(0)
    return pack_masks(ancestor_matrix(parents, n - 1), num_words)[0]


def best_path_chain(tokens: torch.Tensor, parents: torch.Tensor, first_leaf: int,
                    depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tree's best path (root to its first deepest node, the top-scored leaf of a beam
    tree) as a chain over the same number of nodes: the path's tokens, then the last one
    repeated (any token is lossless to verify).

    Args:
        tokens: [B, N-1] int64 draft tokens (BFS, root excluded).
        parents: [B, N] int64.
        first_leaf: BFS index of the first node of the deepest level.
        depth: the trees' depth.
    Returns:
        (tokens [B, N-1], parents [B, N] = -1, 0, 1, ...).
    """
    batch, n = parents.shape
    path = torch.empty(batch, depth, dtype=torch.long, device=tokens.device)
    node = torch.full((batch,), first_leaf, dtype=torch.long, device=tokens.device)
    for d in range(depth - 1, -1, -1):
        path[:, d] = node
        node = parents.gather(1, node.unsqueeze(1)).squeeze(1).clamp(min=0)
    path_tokens = tokens.gather(1, path - 1)                            # [B, depth]
    filler = path_tokens[:, -1:].expand(batch, n - 1 - depth)
    chain_tokens = torch.cat([path_tokens, filler], dim=1)
    chain_parents = torch.arange(-1, n - 1, device=tokens.device).expand(batch, n)
    return chain_tokens, chain_parents


# --------------------------------------------------------------------------- randomness
def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, key: torch.Tensor, counter: torch.Tensor,
                   salt: int) -> torch.Tensor:
    """Uniform (0, 1) float64 numbers from a hash of (seed, key, counter, salt).

    Args:
        seeds: [R] int64 per-row seed (any value).
        key: [R] int64 per-row key (the root's position: a new one every step).
        counter: [C] int64 what is drawn (node or token index); the result is [R, C].
        salt: separates the purposes of the draws.
    Returns:
        [R, C] float64 in (0, 1), 53 random bits each.
    """
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _fmix32(seed_lo ^ _fmix32(seed_hi ^ _fmix32((key & _MASK32) ^ salt)))   # [R]
    c = counter & _MASK32
    h1 = _fmix32(row.unsqueeze(1) ^ _fmix32(c.unsqueeze(0)))                        # [R, C]
    h2 = _fmix32(h1 ^ 0x5BD1E995)
    bits53 = (h1 << 21) | (h2 >> 11)
    return (bits53.to(torch.float64) + 0.5) * (2.0 ** -53)


# --------------------------------------------------------------------------- acceptance
def unpack_masks(masks: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Inverse of `pack_masks`: [..., W] int32 -> [..., num_nodes] bool."""
    shifts = torch.arange(32, device=masks.device, dtype=torch.int32)
    bits = torch.bitwise_and(torch.bitwise_right_shift(masks.unsqueeze(-1), shifts), 1)
    return bits.flatten(-2)[..., :num_nodes].bool()


@dataclass
class DeviceTreeAcceptance:
    """The accepted paths of R rows (N = nodes per row).

    Attributes:
        tokens: [R, N] int64: the accepted path's tokens then the bonus token; entries past
            ``num_sampled`` are -1 (vLLM's ``[num_reqs, num_draft_tokens + 1]`` layout).
        num_sampled: [R] int64 = accepted drafts + 1.
        path: [R, N] int64: the node at each depth of the accepted path (``path[:, 0]`` is the
            root), -1 past the accepted drafts.
    """

    tokens: torch.Tensor
    num_sampled: torch.Tensor
    path: torch.Tensor


@dataclass
class TreeRows:
    """R rows of trees to accept, N nodes each (node 0: the root, the last committed token).

    Attributes:
        tokens: [R, N] int64 node tokens.
        parents: [R, N] int64, root -1, ``parents[:, i] < i``.
        ancestors: [R, N, N] bool, ``[r, i, j]``: node j is node i or one of its ancestors.
        valid: [R, N] bool the nodes verified this step (a BFS prefix; node 0 always).
        logits_rows: [R, N] int64 the row of each node's logits in the step's logits.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    ancestors: torch.Tensor
    valid: torch.Tensor
    logits_rows: torch.Tensor

    @property
    def depth(self) -> torch.Tensor:
        """[R, N] int64 depth of every node."""
        return self.ancestors.sum(dim=-1) - 1


def _accepted_path(rows: TreeRows, steps_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path, given which nodes continue their parent's path.

    Args:
        steps_ok: [R, N] bool: node i is the child its parent's verification picks.
    Returns:
        (path [R, N] as in `DeviceTreeAcceptance`, leaf_depth [R]).
    """
    num_rows, n = steps_ok.shape
    index = torch.arange(n, device=steps_ok.device)
    ok = steps_ok & rows.valid
    ok[:, 0] = True
    # accepted: every node from the root down to it was picked (siblings never both are)
    accepted = ~(rows.ancestors & ~ok.unsqueeze(1)).any(dim=-1)
    depth = rows.depth
    key = torch.where(accepted, depth * (n + 1) + (n - index), -1)
    leaf = key.argmax(dim=1)
    leaf_depth = depth.gather(1, leaf.unsqueeze(1)).squeeze(1)
    on_leaf_path = rows.ancestors.gather(
        1, leaf.view(num_rows, 1, 1).expand(num_rows, 1, n)).squeeze(1)    # [R, N]
    path = torch.full((num_rows, n + 1), -1, dtype=torch.long, device=steps_ok.device)
    path.scatter_(1, torch.where(on_leaf_path, depth, n), index.expand(num_rows, n).clone())
    return path[:, :n], leaf_depth


def _emit(rows: TreeRows, path: torch.Tensor, leaf_depth: torch.Tensor,
          last: torch.Tensor) -> DeviceTreeAcceptance:
    """Output tokens: the path's tokens below the root, then `last` at the leaf's depth."""
    below = torch.cat([path[:, 1:], path.new_full((path.shape[0], 1), -1)], dim=1)
    tokens = torch.where(below >= 0, rows.tokens.gather(1, below.clamp(min=0)), -1)
    tokens.scatter_(1, leaf_depth.unsqueeze(1), last.unsqueeze(1).to(tokens.dtype))
    return DeviceTreeAcceptance(tokens=tokens, num_sampled=leaf_depth + 1, path=path)


def accept_greedy_device(rows: TreeRows, argmax: torch.Tensor) -> DeviceTreeAcceptance:
    """Greedy tree acceptance: the longest path whose every token is the target's argmax at
    its parent; the bonus token is the argmax at the path's end (what greedy decoding without
    speculation emits, token for token).

    Args:
        argmax: [L] int64 the target's argmax at every logits row of the step.
    """
    node_argmax = argmax[rows.logits_rows]                                   # [R, N]
    picked = rows.tokens == node_argmax.gather(1, rows.parents.clamp(min=0))
    path, leaf_depth = _accepted_path(rows, picked)
    leaf = path.gather(1, leaf_depth.unsqueeze(1)).squeeze(1)
    return _emit(rows, path, leaf_depth, node_argmax.gather(1, leaf.unsqueeze(1)).squeeze(1))


def accept_sampled_device(rows: TreeRows, logits: torch.Tensor, logsumexp: torch.Tensor,
                          seeds: torch.Tensor, root_positions: torch.Tensor
                          ) -> DeviceTreeAcceptance:
    """Sampled tree acceptance that keeps the target's distribution exactly.

    At a node with target distribution p and children c_1..c_m (BFS order, distinct tokens),
    c_k is picked with probability p(c_k) / (1 - p(c_1) - ... - p(c_{k-1})) once c_1..c_{k-1}
    were not; the walk follows picked children from the root, and where no child is picked the
    emitted token is drawn from p without c_1..c_m, renormalised. Each emitted token follows p
    (the factors telescope; `tree_acceptance` is the host version). Every node's pick is
    decided at once from its own draw, so the walk costs no loop over depths.

    Args:
        logits: [L, V] the step's processed logits (temperature, top-k/top-p applied).
        logsumexp: [L] fp32 of those rows.
        seeds: [R] int64 the requests' seeds; root_positions: [R] int64 (a new key each step).
    """
    num_rows, n = rows.tokens.shape
    vocab = logits.shape[1]
    device = rows.tokens.device
    index = torch.arange(n, device=device)
    safe_tokens = rows.tokens.clamp(min=0, max=vocab - 1)
    parent_rows = rows.logits_rows.gather(1, rows.parents.clamp(min=0))     # [R, N]
    log_p = logits[parent_rows, safe_tokens].double() - logsumexp[parent_rows].double()
    is_child = rows.valid & (rows.parents >= 0)
    cand = torch.where(is_child, log_p.exp(), 0.0)                          # p_parent(token)
    siblings_before = ((rows.parents.unsqueeze(2) == rows.parents.unsqueeze(1))
                       & (index.view(1, 1, n) < index.view(1, n, 1)))      # [R, i, j]: j < i
    remaining = 1.0 - torch.bmm(siblings_before.double(), cand.unsqueeze(2)).squeeze(2)
    draws = hashed_uniform(seeds, root_positions, index, _SALT_ACCEPT)
    take = is_child & (remaining > 0) & (draws * remaining < cand)
    first_taken = take & ~(siblings_before & take.unsqueeze(1)).any(dim=-1)
    path, leaf_depth = _accepted_path(rows, first_taken)
    leaf = path.gather(1, leaf_depth.unsqueeze(1)).squeeze(1)
    # The last token: p at the leaf without its children (every one of them was not picked).
    leaf_row = rows.logits_rows.gather(1, leaf.unsqueeze(1)).squeeze(1)
    probs = torch.softmax(logits[leaf_row].float(), dim=-1)
    kids = rows.valid & (rows.parents == leaf.unsqueeze(1))
    drop = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
    drop.scatter_(1, torch.where(kids, safe_tokens, vocab), True)
    residual = probs.masked_fill(drop[:, :vocab], 0.0)
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, probs)
    race = hashed_uniform(seeds, root_positions * (n + 1) + leaf,
                          torch.arange(vocab, device=device), _SALT_RESAMPLE)
    # argmax of p / E, E ~ Exp(1) independent: token t with probability p(t) / sum(p)
    last = (residual.double() / -torch.log(race)).argmax(dim=1)
    return _emit(rows, path, leaf_depth, last)


def select_rows(greedy: torch.Tensor, a: DeviceTreeAcceptance,
                b: DeviceTreeAcceptance) -> DeviceTreeAcceptance:
    """Row-wise ``a if greedy else b``."""
    g = greedy.unsqueeze(1)
    return DeviceTreeAcceptance(tokens=torch.where(g, a.tokens, b.tokens),
                                num_sampled=torch.where(greedy, a.num_sampled, b.num_sampled),
                                path=torch.where(g, a.path, b.path))


# --------------------------------------------------------------------------- KV compaction
def compaction_pairs(path: torch.Tensor, num_sampled: torch.Tensor, query_start: torch.Tensor,
                     slot_mapping: torch.Tensor, max_depth: int | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots that move each accepted path next to its root, fixed-size.

    Node i of row r sat in slot ``slot_mapping[query_start[r] + i]`` (vLLM laid the tree out
    as a chain); the path's node at depth d must end in the slot of chain position d.

    Args:
        path: [R, D+1] int64 (`DeviceTreeAcceptance.path`).
        num_sampled: [R] accepted drafts + 1 (0: the row produced nothing).
        query_start: [R] int64 first token of each row in the step's input.
        slot_mapping: [num_tokens] the step's cache slot of every input token.
        max_depth: the deepest node that can sit off its chain position (the tree's depth;
            chain rows never move). Default: D.
    Returns:
        (src, dst): [R * max_depth] int64 each, -1 where nothing moves (``compact_kv_caches``
        skips those).
    """
    depth = path.shape[1] - 1 if max_depth is None else min(max_depth, path.shape[1] - 1)
    path = path[:, :depth + 1]
    d = torch.arange(1, depth + 1, device=path.device)
    node = path[:, 1:]                                                        # [R, D]
    moves = (d < num_sampled.unsqueeze(1)) & (node >= 0) & (node != d)
    base = query_start.long().unsqueeze(1)
    src = slot_mapping[(base + node.clamp(min=0)).clamp(max=slot_mapping.shape[0] - 1)]
    dst = slot_mapping[(base + d).clamp(max=slot_mapping.shape[0] - 1)]
    src = torch.where(moves, src.long(), -1).reshape(-1)
    dst = torch.where(moves, dst.long(), -1).reshape(-1)
    return src, dst
