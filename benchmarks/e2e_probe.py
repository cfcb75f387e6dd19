"""A vLLM worker extension (``LLM(worker_extension_cls=PROBE)``) that reports, from inside each
worker process, what only the worker can see: device memory, the KV cache's size, the model
runner actually in use. Called by name through ``LLM.collective_rpc``."""

from __future__ import annotations

import platform
from typing import Any

PROBE = "vllm_longspec_benchmarks.e2e_probe.BenchProbe"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


class BenchProbe:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def bench_reset_peak_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def bench_report(self) -> dict[str, Any]:
        """Peak / current bytes of PyTorch's allocator in this worker since the last reset
        (it includes the KV cache, which vLLM allocates through PyTorch), the KV cache's own
        bytes, the device name and the model runner's class."""
        import torch

        runner = getattr(self, "model_runner", None)
        kv_bytes, seen = 0, set()
        for tensor in getattr(runner, "kv_caches", None) or []:
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    kv_bytes += storage.nbytes()
        report: dict[str, Any] = {
            "model_runner": f"{type(runner).__module__}.{type(runner).__name__}",
            "kv_cache_bytes": kv_bytes}
        tree_slots = getattr(getattr(runner, "speculator", None), "tree_slots", None)
        if tree_slots is not None:  # Model Runner V2 with a tree: which bookkeeping ran
            report["tree_bookkeeping"] = "triton" if tree_slots.fused else "torch"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            report.update(device_name=torch.cuda.get_device_name(),
                          torch_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                          torch_allocated_bytes=torch.cuda.memory_allocated(),
                          torch_max_reserved_bytes=torch.cuda.max_memory_reserved())
        else:
            report.update(device_name=_cpu_name(), torch_max_allocated_bytes=None,
                          torch_allocated_bytes=None, torch_max_reserved_bytes=None)
        return report
