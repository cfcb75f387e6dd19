"""`DeviceProposer` (Model Runner V2's drafting) against brute force, on small CPU tensors.

The V2 path keeps no host bookkeeping: after each step it re-derives the ring writes and the
drafting inputs from the runner's token history and lengths. These tests replay a few steps of
a small batch (refill, decode steps committing 1..depth+1 tokens, an idle mid-prefill request,
a slot reused by a new request) and check after every step that each live request's ring row
holds exactly the K/V of its last `window` committed tokens, that idle rows were not touched,
and that the drafts equal what the drafting returns for inputs built by hand.
"""

from __future__ import annotations

import torch

from vllm_longspec.compat.fused_ops import FusedOps
from vllm_longspec.config import LongSpecConfig
from vllm_longspec.draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights
from vllm_longspec.draft.ring_cache import DraftKVRing
from vllm_longspec.draft.rope import rope_from_cos_sin
from vllm_longspec.engine.device_proposer import DeviceProposer, DeviceStep
from vllm_longspec.engine.draft_graphs import DraftInputs
from vllm_longspec.engine.drafter import LongSpecDrafter
from vllm_longspec.engine.prompt_lookup import lookup_continuations_ref
from vllm_longspec.engine.serving_layer import ServingDraftLayer
from vllm_longspec.engine.vocab_head import DraftVocabHead, VocabShard

ARCH = DraftArchitecture(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=40)
SLOTS, MAX_LEN, WINDOW, DEPTH = 4, 64, 8, 3
BLOCK, NUM_BLOCKS = 4, 80


class _Rotary:
    """Rotate-half RoPE (the convention of the targets LongSpec supports)."""

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv = 1.0 / (10000 ** (torch.arange(0, ARCH.head_dim, 2).float() / ARCH.head_dim))
        angles = position_ids.float()[..., None] * inv
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def _drafter(widths: tuple[int, ...] | None = None, lookup: int = 0,
             depth: int = DEPTH, model_tokens: int | None = None) -> LongSpecDrafter:
    torch.manual_seed(0)
    config = LongSpecConfig(draft="/unused", num_speculative_tokens=depth, window=WINDOW,
                            tree_widths=widths, prompt_lookup_max=lookup,
                            draft_model_tokens=model_tokens)
    drafter = LongSpecDrafter(vllm_config=None, config=config, ring_rows=SLOTS + 1)
    drafter.draft = ServingDraftLayer(init_draft_weights(LongSpecDraftLayer(ARCH), seed=3,
                                                         std=0.2), FusedOps(False))
    drafter.arch = ARCH
    embedding = torch.randn(ARCH.vocab_size, ARCH.hidden_size)
    head = torch.randn(ARCH.vocab_size, ARCH.hidden_size)

    class _Target:
        device = torch.device("cpu")
        dtype = torch.float32

        @staticmethod
        def embed(ids):
            return embedding[ids]

    drafter.target = _Target()
    drafter.vocab_head = DraftVocabHead(lambda h: h @ head.T,
                                        VocabShard(0, ARCH.vocab_size, ARCH.vocab_size))
    drafter.rope = rope_from_cos_sin(_Rotary(), ARCH.head_dim)
    drafter.ring = DraftKVRing(SLOTS + 1, WINDOW, ARCH.num_key_value_heads, ARCH.head_dim,
                               torch.float32, "cpu")
    cache_k = torch.randn(NUM_BLOCKS, BLOCK, ARCH.num_key_value_heads, ARCH.head_dim)
    cache_v = torch.randn_like(cache_k)
    drafter.target_kv = lambda: (cache_k, cache_v)
    return drafter


def _block_table(slots: list[int]) -> torch.Tensor:
    per_slot = MAX_LEN // BLOCK
    return torch.tensor([[s * per_slot + j for j in range(per_slot)] for s in slots],
                        dtype=torch.int32)


def _expected_kv(drafter: LongSpecDrafter, tokens: torch.Tensor, n: int):
    """Ring row a request of `n` committed tokens must hold: {slot: (k, v)}."""
    positions = torch.arange(max(0, n - WINDOW), n)
    k, v = drafter.draft.self_kv(drafter.target.embed(tokens[positions]), positions,
                                 drafter.rope)
    return {int(p) % WINDOW: (k[i], v[i]) for i, p in enumerate(positions)}


def _check_ring(drafter: LongSpecDrafter, history: torch.Tensor, committed: dict[int, int]):
    for slot, n in committed.items():
        for ring_slot, (k, v) in _expected_kv(drafter, history[slot], n).items():
            assert torch.allclose(drafter.ring.k[slot, ring_slot], k, atol=1e-5), (slot, n)
            assert torch.allclose(drafter.ring.v[slot, ring_slot], v, atol=1e-5), (slot, n)


def _expected_drafts(drafter: LongSpecDrafter, history: torch.Tensor, slots: list[int],
                     committed: list[int], live: list[bool]) -> torch.Tensor:
    inputs = DraftInputs.from_requests(
        roots=[int(history[s, n - 1]) for s, n in zip(slots, committed)],
        ring_rows=[s if ok else SLOTS for s, ok in zip(slots, live)],
        ring_valid=[min(n, WINDOW) if ok else 1 for n, ok in zip(committed, live)],
        root_positions=[n - 1 for n in committed],
        prefix_lens=[n - 1 if ok else 0 for n, ok in zip(committed, live)],
        block_table=_block_table(slots))
    tokens, _ = drafter.draft_tree(inputs, max(committed))
    return tokens


def _step(proposer: DeviceProposer, slots: list[int], sampled: list[int],
          committed: list[int], refill: bool) -> torch.Tensor:
    tokens, _ = proposer.propose(DeviceStep(
        slots=torch.tensor(slots), num_sampled=torch.tensor(sampled, dtype=torch.int32),
        committed=torch.tensor(committed), block_table=_block_table(slots),
        max_committed=max(committed), refill=refill))
    return tokens


def test_ring_and_drafts_follow_the_token_history_across_steps():
    drafter = _drafter()
    torch.manual_seed(1)
    history = torch.randint(0, ARCH.vocab_size, (SLOTS, MAX_LEN), dtype=torch.int32)
    proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=False, max_slots=SLOTS)
    assert proposer.decode_span == DEPTH + 1

    # Step 1: slots 2 and 0 finish their prefill (13 and 5 prompt tokens + 1 sampled); slot 3
    # is in the middle of a chunked prefill (nothing sampled).
    sentinel = drafter.ring.k[3].clone()
    drafts = _step(proposer, [2, 0, 3], [1, 1, 0], [14, 6, 9], refill=True)
    _check_ring(drafter, history, {2: 14, 0: 6})
    assert torch.equal(drafter.ring.k[3], sentinel), "an idle request's row was written"
    assert torch.equal(drafts, _expected_drafts(drafter, history, [2, 0, 3], [14, 6, 9],
                                                [True, True, False]))

    # Decode steps committing 1..DEPTH+1 tokens (no refill: only the last DEPTH+1 positions
    # are rewritten), crossing the window's wrap-around.
    committed = {2: 14, 0: 6}
    for sampled in ([4, 2], [1, 4], [3, 3], [4, 1]):
        for slot, s in zip((2, 0), sampled):
            committed[slot] += s
        drafts = _step(proposer, [2, 0], sampled, [committed[2], committed[0]], refill=False)
        _check_ring(drafter, history, committed)
        assert torch.equal(drafts, _expected_drafts(drafter, history, [2, 0],
                                                    [committed[2], committed[0]],
                                                    [True, True]))

    # Slot 0 is reused by a new request (a refill step): its row is rebuilt from its history.
    history[0] = torch.randint(0, ARCH.vocab_size, (MAX_LEN,), dtype=torch.int32)
    committed[2] += 2
    _step(proposer, [0, 2], [1, 2], [11, committed[2]], refill=True)
    _check_ring(drafter, history, {0: 11, 2: committed[2]})


def test_tree_drafts_have_the_tree_shape():
    drafter = _drafter(widths=(2, 3, 2))
    history = torch.randint(0, ARCH.vocab_size, (SLOTS, MAX_LEN), dtype=torch.int32)
    proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=False, max_slots=SLOTS)
    drafts = _step(proposer, [1], [1], [20], refill=True)
    assert drafts.shape == (1, 7)
    assert torch.equal(drafts, _expected_drafts(drafter, history, [1], [20], [True]))


def test_graph_batch_limit_respects_the_logits_budget():
    drafter = _drafter(widths=(2, 3, 2))
    history = torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32)
    proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=True, max_slots=SLOTS)
    assert proposer.max_graph_batch == SLOTS  # 3 x 40 x 4 bytes per request: far below it
    import vllm_longspec.engine.device_proposer as module

    budget = module.GRAPH_LOGITS_BUDGET_BYTES
    try:
        module.GRAPH_LOGITS_BUDGET_BYTES = 3 * ARCH.vocab_size * 4 * 2
        assert DeviceProposer(drafter, history, MAX_LEN, use_graphs=True,
                              max_slots=SLOTS).max_graph_batch == 2
    finally:
        module.GRAPH_LOGITS_BUDGET_BYTES = budget


def test_prompt_lookup_replaces_drafts_with_copies_of_the_history():
    drafter = _drafter(lookup=3)
    torch.manual_seed(2)
    history = torch.randint(0, ARCH.vocab_size, (SLOTS, MAX_LEN), dtype=torch.int32)
    # Slot 1 (30 committed): its last 3 tokens occurred at 10..12, followed by 13, 14 (copied)
    # and the rest; slot 3 (25 committed) has no match but a stale one beyond its length.
    history[1, 10:13] = history[1, 27:30]
    history[3, 22:25] = torch.tensor([1, 2, 3], dtype=torch.int32)
    history[3, :22][(history[3, :22] >= 1) & (history[3, :22] <= 3)] = 0
    history[3, 40:43] = torch.tensor([1, 2, 3], dtype=torch.int32)
    slots, committed = [1, 3], [30, 25]
    copies = lookup_continuations_ref(history[slots].tolist(), committed, DEPTH, 2, 3)
    assert copies[0] == history[1, 13:13 + DEPTH].tolist() and copies[1] == [None] * DEPTH
    for max_committed in (max(committed), MAX_LEN):  # eager bound and the graphs' full width
        proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=False, max_slots=SLOTS)
        drafts, _ = proposer.propose(DeviceStep(
            slots=torch.tensor(slots), num_sampled=torch.tensor([1, 1], dtype=torch.int32),
            committed=torch.tensor(committed), block_table=_block_table(slots),
            max_committed=max_committed, refill=True))
        assert drafts[0].tolist() == copies[0]
        plain = _expected_drafts(drafter, history, slots, committed, [True, True])  # ring filled
        assert torch.equal(drafts[1], plain[1]) and not torch.equal(drafts[0], plain[0])


def test_prompt_lookup_ignores_a_chunked_prefill_longer_than_the_eager_bound():
    # vLLM V2 counts a request in the middle of a chunked prefill with its whole prompt
    # (total_len) while the step's host bound covers only what is computed so far: the lookup
    # must neither index past that bound (the H200 crash of 2026-12-03d) nor copy for it.
    drafter = _drafter(lookup=3)
    torch.manual_seed(4)
    history = torch.randint(0, ARCH.vocab_size, (SLOTS, MAX_LEN), dtype=torch.int32)
    history[1, 10:13] = history[1, 27:30]
    slots, committed = [1, 2], [30, MAX_LEN - 1]
    proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=False, max_slots=SLOTS)
    drafts, _ = proposer.propose(DeviceStep(
        slots=torch.tensor(slots), num_sampled=torch.tensor([1, 0], dtype=torch.int32),
        committed=torch.tensor(committed), block_table=_block_table(slots),
        max_committed=31, refill=True))
    assert drafts[0].tolist() == history[1, 13:13 + DEPTH].tolist()
    assert drafts.shape == (2, DEPTH)


def test_lookup_only_positions_beyond_the_draft_models_tokens():
    # 6 speculative tokens, 2 from the draft model: a request with a long copy gets 6 copied
    # tokens; one without a copy gets the model's 2 and its last token repeated.
    drafter = _drafter(lookup=3, depth=6, model_tokens=2)
    assert drafter.widths == (1, 1)
    torch.manual_seed(3)
    history = torch.randint(4, ARCH.vocab_size, (SLOTS, MAX_LEN), dtype=torch.int32)
    history[1, 5:8] = history[1, 37:40]
    history[3, 22:25] = torch.tensor([1, 2, 3], dtype=torch.int32)
    slots, committed = [1, 3], [40, 25]
    proposer = DeviceProposer(drafter, history, MAX_LEN, use_graphs=False, max_slots=SLOTS)
    assert proposer.decode_span == 7 and proposer.num_drafts == 6
    drafts, _ = proposer.propose(DeviceStep(
        slots=torch.tensor(slots), num_sampled=torch.tensor([1, 1], dtype=torch.int32),
        committed=torch.tensor(committed), block_table=_block_table(slots),
        max_committed=max(committed), refill=True))
    assert drafts.shape == (2, 6)
    assert drafts[0].tolist() == history[1, 8:14].tolist()
    plain = _expected_drafts(drafter, history, slots, committed, [True, True])
    assert plain.shape == (2, 2)
    assert drafts[1].tolist() == plain[1].tolist() + [int(plain[1, -1])] * 4
