"""Worker -> API server channel for LongSpec's health counters.

vLLM gives a plugin no channel for its own per-step numbers from a worker process to the API
server that serves ``/metrics``. So each worker mirrors its counters into a small memory-mapped
file, written in place every step (no system call), and the API server reads the files when
``/metrics`` is scraped:

    $LONGSPEC_HEALTH_DIR/worker-<pid>.bin

`ensure_health_dir_env` picks the folder in a server's first process (``register()`` runs there
before vLLM starts the engine core and the workers, which inherit the environment; processes
started by ``multiprocessing`` keep their parent's folder). This works whatever the executor
(workers inside the engine core on one GPU, separate processes on CPU or with tensor parallelism)
in vLLM 0.26 and 0.32. Tensor-parallel ranks draft the same batch, so only rank 0's file counts.

File layout (little endian): a 32-byte header (magic, pid, data-parallel rank, tensor-parallel
rank, slot count) and `_SLOTS` slots of 64 bytes (name: 55 bytes NUL-padded, kind: b"c" counter
or b"g" gauge, value: int64).
"""

from __future__ import annotations

import atexit
import mmap
import multiprocessing
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Mapping

# Not VLLM_*: vLLM warns about (or refuses) unknown VLLM_* environment variables.
HEALTH_DIR_ENV = "LONGSPEC_HEALTH_DIR"

_MAGIC = b"LSHLTH01"
_HEADER = struct.Struct("<8sqiii")   # magic, pid, dp_rank, tp_rank, num_slots
_HEADER_SIZE = 32
_SLOT = struct.Struct("<55scq")      # name, kind, value
_SLOT_SIZE = 64
_SLOTS = 64
_FILE_SIZE = _HEADER_SIZE + _SLOTS * _SLOT_SIZE
_VALUE_OFFSET = 56                   # of the int64 inside a slot
MAX_NAME_BYTES = 55


def ensure_health_dir_env() -> str:
    """Returns this server's health folder, choosing a fresh one in a server's first process.

    Only a path is chosen here; workers create the folder when they first publish. The process
    that chose it removes it at exit.
    """
    path = os.environ.get(HEALTH_DIR_ENV)
    if path and multiprocessing.parent_process() is not None:
        return path  # an engine core or worker of a server: use the server's folder
    if path and os.environ.get("_LONGSPEC_HEALTH_OWNER") == str(os.getpid()):
        return path
    # A new server (or an offline engine): never share a folder inherited from the shell or a
    # test runner with another server.
    path = os.path.join(tempfile.gettempdir(),
                        f"vllm-longspec-health-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.environ[HEALTH_DIR_ENV] = path
    os.environ["_LONGSPEC_HEALTH_OWNER"] = str(os.getpid())
    atexit.register(shutil.rmtree, path, True)
    return path


class WorkerHealthFile:
    """The writing end: one per worker process, updated in place after every drafting step."""

    def __init__(self, folder: str, dp_rank: int = 0, tp_rank: int = 0):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"worker-{os.getpid()}.bin")
        with open(self.path, "wb") as f:
            f.write(b"\0" * _FILE_SIZE)
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), _FILE_SIZE)
        _HEADER.pack_into(self._map, 0, _MAGIC, os.getpid(), dp_rank, tp_rank, _SLOTS)
        self._slot_of: dict[str, int] = {}

    def _slot(self, name: str, kind: bytes) -> int:
        slot = self._slot_of.get(name)
        if slot is None:
            encoded = name.encode()
            if len(encoded) > MAX_NAME_BYTES:
                raise ValueError(f"health metric name {name!r} is longer than "
                                 f"{MAX_NAME_BYTES} bytes")
            if len(self._slot_of) == _SLOTS:
                raise ValueError(f"more than {_SLOTS} health metrics")
            slot = len(self._slot_of)
            _SLOT.pack_into(self._map, _HEADER_SIZE + slot * _SLOT_SIZE, encoded, kind, 0)
            self._slot_of[name] = slot
        return slot

    def publish(self, counters: Mapping[str, int], gauges: Mapping[str, int]) -> None:
        """Writes the current values (counters only ever grow; gauges are levels)."""
        for values, kind in ((counters, b"c"), (gauges, b"g")):
            for name, value in values.items():
                offset = _HEADER_SIZE + self._slot(name, kind) * _SLOT_SIZE + _VALUE_OFFSET
                struct.pack_into("<q", self._map, offset, int(value))


@dataclass
class HealthSnapshot:
    """Counters and gauges summed over the live workers (tensor-parallel rank 0 only)."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    workers: int = 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_health_dir(folder: str | None = None) -> HealthSnapshot:
    """The reading end (API server): sums every live worker's file in `folder` (default: this
    process's health folder). A missing folder means no worker has drafted yet."""
    folder = folder or os.environ.get(HEALTH_DIR_ENV)
    snapshot = HealthSnapshot()
    if not folder or not os.path.isdir(folder):
        return snapshot
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".bin"):
            continue
        try:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read(_FILE_SIZE)
        except OSError:
            continue
        if len(data) < _FILE_SIZE:
            continue
        magic, pid, _dp_rank, tp_rank, num_slots = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC or tp_rank != 0 or not _alive(pid):
            continue
        snapshot.workers += 1
        for slot in range(min(num_slots, _SLOTS)):
            raw, kind, value = _SLOT.unpack_from(data, _HEADER_SIZE + slot * _SLOT_SIZE)
            metric = raw.rstrip(b"\0").decode(errors="replace")
            if not metric:
                break
            target = snapshot.counters if kind == b"c" else snapshot.gauges
            target[metric] = target.get(metric, 0) + value
    return snapshot
