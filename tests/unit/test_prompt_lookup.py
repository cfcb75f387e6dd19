"""Prompt lookup (copied continuations) against its plain-Python reference."""

import random

import pytest
import torch

from vllm_longspec.engine.prompt_lookup import lookup_continuations, lookup_continuations_ref


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_reference_on_random_histories(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 50])  # small vocabularies: many matches; 50: few
    batch, width, k = 5, rng.choice([2, 4, 40, 40]), rng.randint(1, 6)
    lo = rng.randint(1, 3)
    hi = rng.randint(lo, 5)
    history = [[rng.randrange(vocab) for _ in range(width)] for _ in range(batch)]
    lengths = [rng.choice([0, 1, 2, rng.randint(min(3, width), width), width]) for _ in range(batch)]
    tokens, valid = lookup_continuations(torch.tensor(history, dtype=torch.int32),
                                         torch.tensor(lengths), k, lo, hi)
    assert tokens.shape == valid.shape == (batch, k) and tokens.dtype == torch.int64
    got = [[int(t) if v else None for t, v in zip(tr, vr)]
           for tr, vr in zip(tokens.tolist(), valid.tolist())]
    assert got == lookup_continuations_ref(history, lengths, k, lo, hi)


def test_longest_then_latest_match_wins_and_copies_stop_at_the_history_end():
    #          0  1  2  3  4  5  6  7  8  9 10 11
    row = [7, 1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3]
    tokens, valid = lookup_continuations(torch.tensor([row]), torch.tensor([12]), 4, 1, 3)
    # "1 2 3" (n=3) occurs at 1..3 (then 9 5 2 3); the later "2 3" at 6..7 is only n=2.
    assert tokens.tolist() == [[9, 5, 2, 3]] and valid.all()
    tokens, valid = lookup_continuations(torch.tensor([row]), torch.tensor([12]), 4, 1, 2)
    assert tokens.tolist()[0][:4] == [8, 1, 2, 3]  # latest "2 3": positions 6..7
    # a match near the end copies only what was committed after it
    tokens, valid = lookup_continuations(torch.tensor([[4, 4, 4, 0, 0]]), torch.tensor([3]), 3,
                                         1, 2)
    assert valid.tolist() == [[True, False, False]] and tokens[0, 0] == 4
    # no match anywhere: nothing valid
    _, valid = lookup_continuations(torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]), 2, 1, 3)
    assert not valid.any()
