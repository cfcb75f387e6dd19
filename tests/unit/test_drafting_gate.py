"""The V1 runner's batch check before drafting (`compat.drafting_gate`), with vLLM's own
``GPUModelRunner._input_fits_in_drafter`` as the wrapped method."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_longspec.compat.drafting_gate import wrap_input_fits_in_drafter

gpu_model_runner = pytest.importorskip("vllm.v1.worker.gpu_model_runner")
VLLM_CHECK = gpu_model_runner.GPUModelRunner.__dict__.get("_input_fits_in_drafter")
pytestmark = pytest.mark.skipif(VLLM_CHECK is None, reason="this vLLM has no batch check")

MAX_MODEL_LEN = 4096
TREE_NODES = 68


def _runner(proposer):
    return SimpleNamespace(drafter=proposer, num_spec_tokens=TREE_NODES,
                           effective_drafter_max_model_len=MAX_MODEL_LEN,
                           speculative_config=SimpleNamespace(use_dflash=lambda: False))


def _metadata(max_seq_len: int):
    return SimpleNamespace(max_seq_len=max_seq_len)


# A request at 4,000 tokens verifies a 68-node tree: seq_len 4,069, and 4,069 + 68 > 4,096
# although 95 positions are left, room for a whole next tree.
NEAR = _metadata(4000 + 1 + TREE_NODES)


def test_vllm_skips_the_batch_for_a_tree_with_room_left():
    assert VLLM_CHECK(_runner(SimpleNamespace()), NEAR) is False


def test_longspec_is_asked_whenever_there_is_metadata():
    check = wrap_input_fits_in_drafter(VLLM_CHECK)
    longspec = _runner(SimpleNamespace(is_longspec_proposer=True))
    assert check(longspec, NEAR) is True
    assert check(longspec, None) is False  # nothing to verify drafts with


def test_other_proposers_get_vllms_answer():
    check = wrap_input_fits_in_drafter(VLLM_CHECK)
    other = _runner(SimpleNamespace())
    assert check(other, NEAR) is False
    assert check(other, _metadata(100)) is True
