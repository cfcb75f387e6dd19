"""Which LongSpec engines run on vLLM's Model Runner V2 (the decision, not the GPU path)."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_longspec.compat.v2_runner import (_REFUSED_FEATURE, _wrap_unsupported_features,
                                            longspec_options, v2_refusal)
from vllm_longspec.engine.spec_config import PROPOSER_CLASS


def _config(options=None, method="custom_class", model=PROPOSER_CLASS, tp=1, pp=1):
    options = {"draft": "/d", "num_speculative_tokens": 4, **(options or {})}
    return SimpleNamespace(
        speculative_config=SimpleNamespace(method=method, model=model),
        additional_config={"longspec": options},
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        _get_v2_model_runner_unsupported_features=None)


def test_chains_run_on_v2_and_the_rest_stays_on_v1():
    assert v2_refusal(_config()) is None
    assert v2_refusal(_config({"draft_vocab_size": 1000})) is None
    assert "tree" in v2_refusal(_config({"tree_widths": [2, 2], "num_speculative_tokens": 2}))
    assert "min_prompt_len" in v2_refusal(_config({"min_prompt_len": 100}))
    assert "parallelism" in v2_refusal(_config(tp=2))
    assert longspec_options(_config(method="eagle")) is None
    assert longspec_options(_config(model="my.Proposer")) is None
    assert v2_refusal(_config(method="ngram")) == "not a LongSpec engine"


def test_v2_refusal_is_lifted_only_for_longspec_chains():
    wrapped = _wrap_unsupported_features(lambda self: [_REFUSED_FEATURE, "stock torch.compile"])
    assert wrapped(_config()) == ["stock torch.compile"]
    tree = _config({"tree_widths": [2, 2], "num_speculative_tokens": 2})
    assert wrapped(tree) == [_REFUSED_FEATURE, "stock torch.compile"]
    other = _config(model="somebody.else.Proposer")
    assert wrapped(other) == [_REFUSED_FEATURE, "stock torch.compile"]
