"""Runs each method's engine in its own child process (``e2e_measure``) and collects what it
wrote, with a progress bar over the points; a child that fails or outlives its time limit is
recorded as an error and the benchmark goes on with the next method."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from .e2e_methods import Method


def read_records(path: str) -> list[dict[str, Any]]:
    """The JSON lines a child wrote (a torn last line, from a killed child, is dropped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _stop(proc: subprocess.Popen) -> None:
    """Ends the child and everything it started (vLLM's engine-core process): the child leads
    its own process group."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: str, offset: int, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return "".join(f.readlines()[-lines:])


def _last_exception(log: str) -> str | None:
    """The last ``SomeError: message`` line of a log (what a traceback ends with)."""
    for line in reversed(log.splitlines()):
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*", line.strip()):
            return line.strip()[:500]
    return None


def run_method(method: Method, config: dict[str, Any], work_dir: str, log_path: str,
               env: dict[str, str], timeout_s: float | None,
               on_point: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One method's child, start to end: returns the method's entry of the results JSON."""
    entry: dict[str, Any] = {"status": "ok", "settings": method.describe(), "points": []}
    cfg_path = os.path.join(work_dir, f"{method.name}.config.json")
    results = os.path.join(work_dir, f"{method.name}.jsonl")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    if os.path.exists(results):
        os.remove(results)
    with open(log_path, "a") as log:
        log.write(f"\n===== {method.name}: {json.dumps(method.describe())}\n")
        log.flush()
        offset = log.tell()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_longspec_benchmarks.e2e_measure", cfg_path, results],
            cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        seen, timed_out = 0, False
        while proc.poll() is None:
            time.sleep(0.5)
            seen = _report_new(results, seen, on_point)
            if timeout_s and time.perf_counter() - start > timeout_s:
                timed_out = True
                _stop(proc)
                break
        _report_new(results, seen, on_point)
    entry["child_wall_s"] = time.perf_counter() - start
    records = read_records(results)
    for rec in records:
        kind = rec.pop("kind")
        if kind == "point":
            entry["points"].append(rec)
        elif kind in ("engine", "memory"):
            entry[kind] = rec
    done = any(r.get("wall_s") is not None for r in records)
    if timed_out or proc.returncode != 0 or not done:
        entry["status"] = "error" if not entry["points"] else "partial"
        why = (f"timed out after {timeout_s:.0f} s" if timed_out
               else f"child exited with {proc.returncode}")
        tail = _log_tail(log_path, offset)
        entry["error"] = f"{why}: {_last_exception(tail) or 'see log_tail'}"
        entry["log_tail"] = tail
    return entry


def _report_new(results: str, seen: int, on_point: Callable[[dict[str, Any]], None]) -> int:
    points = [r for r in read_records(results) if r.get("kind") == "point"]
    for rec in points[seen:]:
        on_point(rec)
    return len(points)
