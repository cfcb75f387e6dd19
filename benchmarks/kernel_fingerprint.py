"""Fingerprints of the attention kernels' GPU code, compiled on any machine (no GPU needed).

A refactor of a tuned Triton kernel (moving lines into a shared ``@triton.jit`` helper, renaming)
need not be re-timed on the GPU when the code the GPU runs did not change. This compiles the
tree and prefix attention kernels for a CUDA architecture at representative configs and prints
a hash of each PTX's instructions (debug info and its labels left out). Run it on two checkouts;
equal fingerprints mean the same GPU code.

    python -m vllm_longspec_benchmarks.kernel_fingerprint                      # installed kernels
    python -m vllm_longspec_benchmarks.kernel_fingerprint --kernels-dir OLD/triton_kernels
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Any

# Configs, Llama-3-8B head shape: tree (block_m, block_n, warps, stages, ieee_dot), prefix
# (block_m, block_t, block_n, warps, stages, partial). Pointers are bf16 unless listed.
TREE = [(64, 64, 4, 2, False), (128, 32, 8, 3, False), (16, 16, 1, 1, True)]
PREFIX = [(128, 16, 128, 8, 2, False), (64, 0, 64, 4, 2, True)]
FP32_POINTERS = {"lse_ptr", "p_lse_ptr"}
INT32_POINTERS = {"mask_ptr", "cu_seqlens_ptr", "p_lens_ptr", "bt_ptr", "lens_ptr", "cu_ptr"}


def load_kernels(kernels_dir: str | None) -> tuple[ModuleType, ModuleType]:
    """The tree and prefix attention modules, from `kernels_dir` (a ``triton_kernels`` folder)
    or the installed ``vllm_longspec_kernels``."""
    if kernels_dir is None:
        return (importlib.import_module("vllm_longspec_kernels.tree_attention"),
                importlib.import_module("vllm_longspec_kernels.prefix_attention"))
    name = "fingerprinted_kernels"
    folder = os.path.abspath(kernels_dir)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return sys.modules[f"{name}.tree_attention"], sys.modules[f"{name}.prefix_attention"]


def instructions(ptx: str) -> str:
    """PTX without debug sections, location directives and the debug-only labels."""
    body = re.split(r"^\s*\.section\s+\.debug", ptx, flags=re.M)[0]
    lines = (line.strip() for line in body.splitlines())
    return "\n".join(line for line in lines if line and not re.match(r"\.(loc|file)\b", line)
                     and not re.fullmatch(r"\$L__tmp\d+:", line))


def compile_ptx(kernel: Any, constexprs: dict[str, Any], arch: int, num_warps: int,
                num_stages: int, out_dtype: str = "*bf16") -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in FP32_POINTERS:
            signature[arg] = "*fp32"
        elif arg in INT32_POINTERS:
            signature[arg] = "*i32"
        elif arg == "o_ptr":
            signature[arg] = out_dtype
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16"
        elif arg == "qk_scale_log2":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    source = ASTSource(kernel, signature=signature, constexprs={
        (kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"]


def fingerprints(kernels_dir: str | None, arch: int) -> dict[str, str]:
    tree, prefix = load_kernels(kernels_dir)
    out = {}
    for bm, bn, warps, stages, ieee in TREE:
        consts = dict(GQA=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=bm, BLOCK_N=bn, HAS_PREFIX=True,
                      HAS_PREFIX_LENS=True, IEEE_DOT=ieee, UPCAST_DOT=False)
        ptx = compile_ptx(tree._tree_attn_fwd_kernel, consts, arch, warps, stages)
        out[f"tree   m{bm} n{bn} w{warps} s{stages} ieee={ieee}"] = ptx
    for bm, bt, bn, warps, stages, partial in PREFIX:
        consts = dict(GQA=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=bm, BLOCK_T=bt, BLOCK_N=bn,
                      PAGE=16, PARTIAL=partial, IEEE_DOT=False, UPCAST_DOT=False)
        ptx = compile_ptx(prefix._prefix_attn_fwd_kernel, consts, arch, warps, stages,
                          out_dtype="*fp32" if partial else "*bf16")
        out[f"prefix m{bm} t{bt} n{bn} w{warps} s{stages} partial={partial}"] = ptx
    return {name: hashlib.sha256(instructions(ptx).encode()).hexdigest()[:16]
            for name, ptx in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels-dir", default=None,
                        help="a triton_kernels folder (default: the installed kernels)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated
    for name, digest in fingerprints(args.kernels_dir, args.arch).items():
        print(f"{name:40s} {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
