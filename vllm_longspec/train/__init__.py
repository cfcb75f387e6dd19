"""Training a LongSpec draft against a frozen target (``vllm-longspec train``).

Modules: data (files -> packed token sequences), positions (anchor-offset), target_kv (frozen
target exposing its last-layer K/V), attention (the draft's training attentions), forward,
loss, metrics (held-out acceptance), long_eval (acceptance over real long prefixes; also a
standalone command), dist (DDP/FSDP plumbing), loop, cli.
"""


def main(argv: list[str] | None = None) -> int:
    """``vllm-longspec train`` (imports torch/transformers only when called)."""
    from .cli import main as _main

    return _main(argv)
