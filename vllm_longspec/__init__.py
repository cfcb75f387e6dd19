"""vllm-longspec: LongSpec speculative decoding for long-context generation, as a vLLM plugin.

Use it through vLLM's own interfaces::

    LLM(model=TARGET,
        speculative_config={"method": "longspec", "model": DRAFT, "num_speculative_tokens": 4},
        additional_config={"longspec": {"window": 512, "min_prompt_len": 0}})

    vllm serve TARGET --speculative-model longspec --longspec-draft DRAFT

`register` is the ``vllm.general_plugins`` entry point. vLLM calls it in the API process before
argument parsing, in the engine core and in every worker (spawned on CPU), several times per
process: it is idempotent, and it imports nothing heavy until it patches.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Applies LongSpec's declared vLLM patches in this process (once)."""
    global _registered
    if _registered:
        return
    from .compat.patches import apply_engine_patches
    from .health.channel import ensure_health_dir_env

    apply_engine_patches()
    ensure_health_dir_env()  # before vLLM starts the engine core: its workers inherit it
    _registered = True
