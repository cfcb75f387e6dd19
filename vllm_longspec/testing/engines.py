"""Run a real vLLM engine in-process for tests and benchmarks, then stop it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    counters: dict[str, Any] = field(default_factory=dict)
    probe: Any = None  # what `after(llm)` returned

    @property
    def acceptance_rate(self) -> float:
        drafted = self.counters.get("num_draft_tokens", 0)
        return self.counters.get("num_accepted_tokens", 0) / drafted if drafted else 0.0


def generate(target: str, prompts: list[list[int]], *, max_tokens: int = 32,
             temperature: float = 0.0, seed: int | None = None, n: int = 1,
             speculative_config: dict | None = None, additional_config: dict | None = None,
             per_prompt: list[dict] | None = None, before: Callable[[Any], Any] | None = None,
             after: Callable[[Any], Any] | None = None, **engine_kwargs: Any) -> EngineRun:
    """Greedy (or sampled) generation of `prompts` (token ids) on one engine.

    `per_prompt`: optional SamplingParams overrides, one dict per prompt (mixed batches).
    `before(llm)` / `after(llm)`: run on the ``LLM`` around generation (e.g. worker probes
    through ``llm.collective_rpc``); what `after` returns is ``EngineRun.probe``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..compat.vllm_api import shutdown_llm, engine_counters

    # Eager: torch.compile would cost each test engine a minute on a 2-core machine.
    kwargs: dict[str, Any] = dict(model=target, dtype="float32", seed=0, enforce_eager=True,
                                  disable_log_stats=False, max_num_seqs=8)
    kwargs.update(engine_kwargs)
    if speculative_config is not None:
        kwargs["speculative_config"] = speculative_config
    if additional_config is not None:
        kwargs["additional_config"] = additional_config
    llm = LLM(**kwargs)
    try:
        base = dict(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed,
                    n=n)
        params: Any = SamplingParams(**base)
        if per_prompt is not None:
            params = [SamplingParams(**{**base, **extra}) for extra in per_prompt]
        if before is not None:
            before(llm)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        token_ids = [list(c.token_ids) for o in outs for c in o.outputs]
        counters = engine_counters(llm)
        probe = after(llm) if after is not None else None
    finally:
        shutdown_llm(llm)
        del llm
    return EngineRun(token_ids=token_ids, counters=counters, probe=probe)
