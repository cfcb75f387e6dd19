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


def test_chains_and_trees_run_on_v2_and_the_rest_stays_on_v1(monkeypatch):
    assert v2_refusal(_config()) is None
    assert v2_refusal(_config({"draft_vocab_size": 1000})) is None
    tree = {"tree_widths": [2, 2], "num_speculative_tokens": 2}
    assert v2_refusal(_config(tree)) is None
    monkeypatch.setenv("LONGSPEC_TREE_RUNNER", "v1")
    assert "V1 runner" in v2_refusal(_config(tree))
    assert v2_refusal(_config()) is None  # chains stay on V2
    assert "min_prompt_len" in v2_refusal(_config({"min_prompt_len": 100}))
    assert "parallelism" in v2_refusal(_config(tp=2))
    assert longspec_options(_config(method="eagle")) is None
    assert longspec_options(_config(model="my.Proposer")) is None
    assert v2_refusal(_config(method="ngram")) == "not a LongSpec engine"


def test_v2_refusal_is_lifted_only_for_longspec_engines_v2_can_run():
    wrapped = _wrap_unsupported_features(lambda self: [_REFUSED_FEATURE, "stock torch.compile"])
    assert wrapped(_config()) == ["stock torch.compile"]
    tree = _config({"tree_widths": [2, 2], "num_speculative_tokens": 2})
    assert wrapped(tree) == ["stock torch.compile"]
    assert wrapped(_config(tp=2)) == [_REFUSED_FEATURE, "stock torch.compile"]
    other = _config(model="somebody.else.Proposer")
    assert wrapped(other) == [_REFUSED_FEATURE, "stock torch.compile"]


def _post_init_config(asked, v2=True, options=None):
    config = _config(options)
    config.scheduler_config = SimpleNamespace(async_scheduling=asked)
    config.parallel_config.disable_nccl_for_dp_synchronization = False
    config.model_config = SimpleNamespace(disable_cascade_attn=False)
    config.use_v2_model_runner = v2
    return config


def _vllm_post_init(config):
    """What vLLM 0.26's own check does for a custom_class method."""
    if config.scheduler_config.async_scheduling:
        raise ValueError("Currently, async scheduling is only supported with EAGLE/MTP/...")
    config.scheduler_config.async_scheduling = False


def test_async_scheduling_is_turned_on_for_longspec_on_v2(monkeypatch):
    import vllm_longspec.compat.v2_runner as module

    monkeypatch.setattr(module, "_executor_supports_async", lambda config: True)
    # vLLM sets this in the test process once an earlier engine has forced spawn.
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    post_init = module._wrap_post_init(_vllm_post_init)
    config = _post_init_config(None)
    post_init(config)
    assert config.scheduler_config.async_scheduling is True
    assert config.model_config.disable_cascade_attn
    post_init(config)  # the engine core runs it again after its handshake: must not raise
    assert config.scheduler_config.async_scheduling is True
    refused = _post_init_config(False)
    post_init(refused)
    assert refused.scheduler_config.async_scheduling is False  # the user said no
    on_v1 = _post_init_config(None, v2=False)
    post_init(on_v1)
    assert on_v1.scheduler_config.async_scheduling is False
    try:
        post_init(_post_init_config(True, v2=False))
        raise AssertionError("async scheduling on V1 must be refused")
    except ValueError as e:
        assert "Model Runner V2" in str(e)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    spawned = _post_init_config(None)
    post_init(spawned)
    assert spawned.scheduler_config.async_scheduling is False
