"""Helpers of the TP-sharding unit test (tests/unit/test_sharding.py) that run inside the
spawned gloo ranks, so they live in an importable module.

Each rank loads its shard from one published (unsharded) checkpoint and runs the draft with
cross-attention over only its KV heads of a "target cache" (as a TP rank's attention layer holds
them), the vocabulary-parallel tree expansion and the acceptance broadcast; results go to
``rank{r}.pt`` (errors to ``rank{r}.err``).
"""

from __future__ import annotations

import os
import traceback

import torch

from ..draft.model import DraftArchitecture, LongSpecDraftLayer

ARCH = DraftArchitecture(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, intermediate_size=192, vocab_size=300)
WORLD = 2


def _rope(head_dim: int):
    """Plain neox RoPE (theta 10000) through the training adapter."""
    from vllm_longspec.draft.rope import rope_from_cos_sin

    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def cos_sin(x, position_ids):
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    return rope_from_cos_sin(cos_sin, head_dim)


def sample_inputs(seed: int = 5):
    """Queries, a target 'last-layer cache' and an lm_head, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    n, m = 12, 40
    return dict(
        embeds=torch.randn(n, ARCH.hidden_size, generator=g),
        positions=torch.arange(100, 100 + n),
        target_k=torch.randn(m, ARCH.num_key_value_heads, ARCH.head_dim, generator=g),
        target_v=torch.randn(m, ARCH.num_key_value_heads, ARCH.head_dim, generator=g),
        lm_head=torch.randn(ARCH.vocab_size, ARCH.hidden_size, generator=g),
        scores=torch.randn(3, 4, generator=g),
    )


def draft_forward(layer: LongSpecDraftLayer, inp: dict, kv_heads: range):
    """Draft output with causal self-attention over the queries and cross-attention over the
    target cache's heads `kv_heads` (what this rank's cache holds)."""
    from vllm_longspec.engine.draft_attention import attend

    n = inp["embeds"].shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    tk = inp["target_k"][:, kv_heads.start:kv_heads.stop]
    tv = inp["target_v"][:, kv_heads.start:kv_heads.stop]

    def self_attend(q, k, v):
        return attend(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), layer.scale,
                      causal.unsqueeze(0))[0][0]

    def cross_attend(q):
        return attend(q, tk, tv, layer.scale)[0]

    rope = _rope(ARCH.head_dim)
    with torch.no_grad():
        hidden = layer(inp["embeds"], inp["positions"], rope, self_attend, cross_attend)
        k, v = layer.self_kv(inp["embeds"], inp["positions"], rope)
    return hidden, k, v


def vocab_head(inp: dict, rank: int, world: int, comm):
    """A vLLM-like vocab shard: contiguous rows, padded with 8 junk rows."""
    from vllm_longspec.engine.vocab_head import DraftVocabHead, VocabShard

    vocab = ARCH.vocab_size
    if comm is None:
        weight = inp["lm_head"]
        return DraftVocabHead(lambda h: h @ weight.T, VocabShard(0, vocab, vocab))
    per = -(-vocab // world)
    start, stop = rank * per, min(vocab, (rank + 1) * per)
    weight = torch.cat([inp["lm_head"][start:stop], torch.full((8, ARCH.hidden_size), 50.0)])
    return DraftVocabHead(lambda h: h @ weight.T, VocabShard(start, stop - start, vocab), comm)


def rank_main(rank: int, world: int, init_file: str, folder: str, out_dir: str) -> None:
    import torch.distributed as dist

    from vllm_longspec.draft.checkpoint import load_draft_checkpoint
    from vllm_longspec.draft.sharding import TorchDistComm, build_sharded_draft_layer
    from vllm_longspec.engine.tp_agreement import agree_on_acceptance
    from vllm_longspec.engine.tree_acceptance import TreeAcceptance

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        comm = TorchDistComm()
        layer = build_sharded_draft_layer(load_draft_checkpoint(folder), comm)
        inp = sample_inputs()
        hidden, k, v = draft_forward(layer, inp, layer.shard.kv_heads)
        head = vocab_head(inp, rank, world, comm)
        level = head.expand_level(hidden, inp["scores"], 16)
        logprobs = head.log_probs(hidden)
        # acceptance: rank 1 disagrees on the second row and must end with rank 0's
        mine = [TreeAcceptance([7, 8], [1]), TreeAcceptance([3 + rank], [])]

        class Plan:  # the two fields agree_on_acceptance reads
            max_nodes = 4
            rows = torch.zeros(2)

        stats: dict[str, int] = {}
        agreed = agree_on_acceptance(mine, Plan, comm, stats)
        # tree rows: rank 0 holds trees for rows 0 and 2, rank 1 for rows 2 and 3
        from ..engine.tp_agreement import agree_on_tree_rows
        from ..engine.verification import TreeRowCandidate

        rows = [0, 2] if rank == 0 else [2, 3]
        candidates = [TreeRowCandidate(row=r, req_id=str(r), query_start=0, num_scheduled=1,
                                       num_computed=0, parents=None, tokens=None)
                      for r in rows]
        tree_rows = [c.row for c in agree_on_tree_rows(candidates, 5, comm, "cpu", stats)]
        torch.save(dict(hidden=hidden, k=k, v=v, tokens=level.tokens, parents=level.parent_local,
                        scores=level.scores, logprobs=logprobs, start=head.shard.start,
                        kv_heads=(layer.shard.kv_heads.start, layer.shard.kv_heads.stop),
                        agreed=[(a.tokens, a.nodes) for a in agreed],
                        disagreements=stats["tp_disagreements"], tree_rows=tree_rows,
                        tree_rows_dropped=stats["tp_tree_rows_dropped"]),
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
