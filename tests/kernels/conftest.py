"""Kernel tests run on CPU through Triton's interpreter; make `vllm_longspec_kernels` importable.

The kernels live in `triton_kernels/` and are installed under the name `vllm_longspec_kernels`
(setup.py's package_dir). When the repo is not installed, that directory is loaded under the
installed name so the tests exercise the same import path.

Triton picks interpreter vs. compiled mode when a kernel is decorated (and reads the variable again
at launch), so on CPU TRITON_INTERPRET=1 is set while the package is imported here (a copy imported
earlier in compiled mode is dropped) and during each kernel test (autouse fixture). Outside those
windows the variable is restored, so other test directories (vLLM engines) are not affected.
"""

import importlib
import importlib.util
import os
import pathlib
import random
import sys

import pytest
import torch

_PKG = "vllm_longspec_kernels"
_SRC = pathlib.Path(__file__).resolve().parents[2] / "triton_kernels"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ours(name: str) -> bool:
    return name == _PKG or name.startswith(_PKG + ".")


# Modules of the package imported before this conftest (compiled mode); restored after collection.
_SAVED = {name: mod for name, mod in sys.modules.items() if _ours(name)}


def _import_kernels():
    loaded = sys.modules.get(_PKG)
    if loaded is not None and (DEVICE == "cuda" or loaded.is_triton_interpret()):
        return
    for name in [m for m in sys.modules if _ours(m)]:
        del sys.modules[name]
    saved = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        if importlib.util.find_spec(_PKG) is not None:
            importlib.import_module(_PKG)
        else:
            spec = importlib.util.spec_from_file_location(
                _PKG, _SRC / "__init__.py", submodule_search_locations=[str(_SRC)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[_PKG] = module
            spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _check_triton_stdlib_interpreted():
    """Triton's own @jit helpers (tl.max, tl.sum, tl.topk, ...) are interpreted only if
    triton.language was first imported under TRITON_INTERPRET=1, i.e. by this conftest. If
    something imported it earlier (vLLM does), every kernel calling them fails under the
    interpreter with "Cannot call @triton.jit'd outside of the scope of a kernel": say why."""
    if DEVICE != "cpu":
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        raise RuntimeError(
            "tests/kernels: triton.language was imported before this conftest, outside "
            "Triton's interpreter (e.g. by `import vllm` in an earlier test module), so its "
            "helpers cannot run the kernels on the CPU. Run tests/kernels in its own process, "
            "or before any module that imports vllm at import time (as `pytest tests` does).")


def pytest_collection_finish(session):
    """The kernel test modules are bound to the interpreted copy by now; hand the rest of the
    session (e.g. vLLM engines in tests/e2e) the normal, compiled-mode package again."""
    if DEVICE == "cpu":
        for name in [m for m in sys.modules if _ours(m)]:
            del sys.modules[name]
        sys.modules.update(_SAVED)


_import_kernels()
_check_triton_stdlib_interpreted()

# Max |kernel - float64 reference| on outputs of magnitude <= ~3 (averages of N(0, 1) values).
OUT_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class KernelTestKit:
    """Small helpers shared by the kernel tests (handed out by the `kit` fixture)."""

    device = DEVICE
    out_atol = OUT_ATOL
    lse_atol = LSE_ATOL

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(dtype).to(self.device)

    def parents(self, n: int, kind: str = "random") -> list[int]:
        """A topologically ordered parent array of n nodes (parent[i] < i, -1 = root)."""
        if n == 0:
            return []
        if kind == "chain":
            return list(range(-1, n - 1))
        if kind == "star":
            return [-1] + [0] * (n - 1)
        if kind == "forest":   # several roots, random attachment otherwise
            return [-1 if i == 0 or self.randint(0, 4) == 0 else self.randint(0, i - 1)
                    for i in range(n)]
        if kind == "beam":     # LongSpec-like levels: each level's parents are in the level above
            par, prev, i = [-1], [0], 1
            while i < n:
                width = min(n - i, self.randint(1, 16))
                level = list(range(i, i + width))
                par += [prev[self.randint(0, len(prev) - 1)] for _ in level]
                prev, i = level, i + width
            return par
        return [-1] + [self.randint(0, i - 1) for i in range(1, n)]

    def cu_seqlens(self, sizes: list[int]) -> torch.Tensor:
        cu = [0]
        for s in sizes:
            cu.append(cu[-1] + s)
        return torch.tensor(cu, dtype=torch.int32, device=self.device)


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def kit() -> KernelTestKit:
    seed = int(os.environ.get("KERNEL_TEST_SEED", random.randrange(2**31)))
    # Printed into the failure report, so a failing draw can be replayed with KERNEL_TEST_SEED.
    print(f"KERNEL_TEST_SEED={seed}")
    return KernelTestKit(seed)
