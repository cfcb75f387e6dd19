"""`vllm serve` as a subprocess on 127.0.0.1: configured, started, waited for, measured, stopped.

`ServerConfig` describes a LongSpec server or, with ``draft=None``, the same server without
speculation (the reference whose greedy outputs LongSpec must reproduce). A token tree is one
more field (`tree_widths`), passed as ``--longspec-tree-widths``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str = "vllm") -> list[str]:
    """The console command (``vllm`` or ``vllm-longspec``) as an argv prefix."""
    exe = shutil.which(name)
    if exe is None:
        raise FileNotFoundError(f"console script {name!r} is not installed")
    return [exe]


@dataclass(frozen=True)
class ServerConfig:
    """A server's settings.

    Attributes:
        draft: LongSpec draft folder; None serves without speculation.
        tree_widths: LongSpec token-tree level widths (None: a chain of
            `num_speculative_tokens`).
        num_gpu_blocks: overrides the KV-cache size in blocks: a small budget makes the
            scheduler preempt under load.
        env: extra environment variables, e.g. fault injection.
    """

    target: str
    draft: str | None = None
    num_speculative_tokens: int = 3
    tree_widths: tuple[int, ...] | None = None
    window: int | None = None
    min_prompt_len: int | None = None
    max_model_len: int = 1024
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None
    dtype: str = "float32"
    enforce_eager: bool = True
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def speculative(self) -> bool:
        return self.draft is not None

    def reference(self) -> "ServerConfig":
        """The same server without speculation (and without injected faults)."""
        env = {k: v for k, v in self.env.items() if not k.startswith("LONGSPEC_INJECT")}
        return replace(self, draft=None, env=env)

    def serve_args(self) -> list[str]:
        """Arguments after ``vllm serve`` (host and port excluded)."""
        args = [self.target, "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_num_seqs), "--seed", str(self.seed)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        for flag, value in (("--max-num-batched-tokens", self.max_num_batched_tokens),
                            ("--num-gpu-blocks-override", self.num_gpu_blocks),
                            ("--block-size", self.block_size),
                            ("--gpu-memory-utilization", self.gpu_memory_utilization)):
            if value is not None:
                args += [flag, str(value)]
        args.append("--enable-prefix-caching" if self.enable_prefix_caching
                    else "--no-enable-prefix-caching")
        if self.draft is not None:
            args += ["--speculative-model", "longspec", "--longspec-draft", self.draft,
                     "--num-speculative-tokens", str(self.num_speculative_tokens)]
            if self.tree_widths:
                args += ["--longspec-tree-widths", ",".join(map(str, self.tree_widths))]
            if self.window is not None:
                args += ["--longspec-window", str(self.window)]
            if self.min_prompt_len is not None:
                args += ["--longspec-min-prompt-len", str(self.min_prompt_len)]
        return args + list(self.extra_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ServerProcess:
    """A running ``vllm serve``; its output goes to `log_path`."""

    def __init__(self, config: ServerConfig, log_path: str, command: list[str] | None = None):
        self.config = config
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **config.env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        argv = (command or launcher("vllm")) + ["serve", *config.serve_args(),
                                                "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def model(self) -> str:
        return self.config.target

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=10) as resp:
                return resp.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its processes (engine core, workers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def tail(self, chars: int = 4000) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def gpu_memory_used_mib() -> float | None:
    """Device memory in use on this machine's GPUs (nvidia-smi), None without one. vLLM
    allocates its KV cache up front, so growth here over rounds means a leak."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(sum(float(line) for line in out.split()))
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def start_servers(configs: dict[str, ServerConfig], log_dir: str,
                  command: list[str] | None = None,
                  timeout_s: float = 600.0) -> dict[str, ServerProcess]:
    """Starts several servers at once (their start-ups overlap) and waits for all; stops them
    all if one fails."""
    servers: dict[str, ServerProcess] = {}
    try:
        for name, config in configs.items():
            servers[name] = ServerProcess(config, os.path.join(log_dir, f"{name}.log"), command)
        for server in servers.values():
            server.wait_ready(timeout_s)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers
