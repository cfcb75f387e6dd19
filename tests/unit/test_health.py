"""The health summary's parts without a server: the worker->API channel, the drafting guard, the
Prometheus collector (fed real vLLM stats objects)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm_longspec.health import channel
from vllm_longspec.health.channel import WorkerHealthFile, read_health_dir
from vllm_longspec.health.guard import INJECT_ENV, InjectedDraftingError, drafting_guard


def test_channel_round_trip(tmp_path):
    writer = WorkerHealthFile(str(tmp_path))
    writer.publish({"steps": 3, "drafting_errors": 0}, {"ring_rows_in_use": 2})
    writer.publish({"steps": 5, "drafting_errors": 1}, {"ring_rows_in_use": 0})
    snapshot = read_health_dir(str(tmp_path))
    assert snapshot.workers == 1
    assert snapshot.counters == {"steps": 5, "drafting_errors": 1}
    assert snapshot.gauges == {"ring_rows_in_use": 0}


def test_channel_ignores_other_tensor_parallel_ranks(tmp_path):
    WorkerHealthFile(str(tmp_path), dp_rank=0, tp_rank=1).publish({"steps": 7}, {})
    assert read_health_dir(str(tmp_path)).workers == 0


def test_channel_ignores_dead_workers(tmp_path):
    code = ("import sys; from vllm_longspec.health.channel import WorkerHealthFile; "
            "WorkerHealthFile(sys.argv[1]).publish({'steps': 9}, {})")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert len(os.listdir(tmp_path)) == 1
    assert read_health_dir(str(tmp_path)).counters == {}


def test_channel_refuses_long_names(tmp_path):
    with pytest.raises(ValueError, match="longer than"):
        WorkerHealthFile(str(tmp_path)).publish({"x" * 60: 1}, {})


def test_health_dir_is_fresh_per_server_and_kept_by_children(monkeypatch, tmp_path):
    monkeypatch.setenv(channel.HEALTH_DIR_ENV, "/tmp/inherited-from-a-shell")
    monkeypatch.setenv("_LONGSPEC_HEALTH_OWNER", "1")
    path = channel.ensure_health_dir_env()
    assert path != "/tmp/inherited-from-a-shell"
    assert channel.ensure_health_dir_env() == path  # stable within the server's process
    script = tmp_path / "server.py"  # spawn re-imports __main__: it must be a file
    script.write_text(
        "import multiprocessing as mp\n"
        "from vllm_longspec.health.channel import ensure_health_dir_env\n"
        "def child(q):\n"
        "    q.put(ensure_health_dir_env())\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn'); q = ctx.Queue()\n"
        "    p = ctx.Process(target=child, args=(q,)); p.start()\n"
        "    print(q.get(timeout=120)); p.join()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=dict(os.environ), check=True, timeout=180).stdout.strip()
    assert out == path  # a spawned engine core / worker uses its server's folder


class _Ring:
    rows_in_use = 2


class _Proposer:
    is_longspec_proposer = True

    def __init__(self):
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_rank=0))
        self.stats = {"steps": 0}
        self.ring = _Ring()
        self.fail = False

    @drafting_guard
    def propose(self, sampled_token_ids, num_tokens_no_spec=None, token_ids_cpu=None,
                slot_mappings=None):
        if self.fail:
            raise IndexError("a drafting bug")
        self.stats["steps"] += 1
        return [[7, 8] if s else [] for s in sampled_token_ids]


def test_guard_turns_a_drafting_error_into_plain_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv(channel.HEALTH_DIR_ENV, str(tmp_path))
    proposer = _Proposer()
    assert proposer.propose([[1], [], [2]]) == [[7, 8], [], [7, 8]]
    proposer.fail = True
    assert proposer.propose([[1], [], [2]]) == [[], [], []]
    assert proposer.stats == {"steps": 1, "drafting_errors": 1, "fallback_drafting_error": 2}
    snapshot = read_health_dir(str(tmp_path))
    assert snapshot.counters == proposer.stats
    assert snapshot.gauges == {"ring_rows_in_use": 2}


def test_guard_injects_faults_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv(channel.HEALTH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(INJECT_ENV, "3")
    proposer = _Proposer()
    results = [proposer.propose([[1]]) for _ in range(7)]
    assert results.count([[]]) == 2  # calls 3 and 6
    assert proposer.stats["drafting_errors"] == 2 and proposer.stats["steps"] == 5


def test_injected_error_type_is_distinct():
    assert issubclass(InjectedDraftingError, RuntimeError)


def test_collector_summary_from_vllm_stats(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from vllm_longspec.health.stat_logger import HealthCollector
    from vllm_longspec.reliability.prom import parse

    monkeypatch.setenv(channel.HEALTH_DIR_ENV, str(tmp_path))
    WorkerHealthFile(str(tmp_path)).publish(
        {"steps": 10, "drafted_requests": 12, "skipped_short_prompt": 4,
         "skipped_max_model_len": 1, "drafting_errors": 1, "fallback_drafting_error": 2,
         "tree_levels": 5}, {"ring_rows_in_use": 3})
    collector = HealthCollector()
    collector.info = {"draft": "/d", "num_speculative_tokens": "3"}
    spec = SpecDecodingStats.new(3)
    spec.observe_draft(num_draft_tokens=3, num_accepted_tokens=2)
    spec.observe_draft(num_draft_tokens=3, num_accepted_tokens=0)
    iteration = IterationStats()
    iteration.finished_requests.append(FinishedRequestStats(FinishReason.LENGTH))
    collector.observe(SchedulerStats(spec_decoding_stats=spec), iteration)
    registry = CollectorRegistry()
    registry.register(collector)
    m = parse(generate_latest(registry).decode())
    assert m.get("vllm_longspec:drafted_requests_total") == 12
    assert m.get("vllm_longspec:fallbacks_total", reason="short_prompt") == 4
    assert m.get("vllm_longspec:fallbacks_total", reason="max_model_len") == 1
    assert m.get("vllm_longspec:fallbacks_total", reason="drafting_error") == 2
    assert m.get("vllm_longspec:drafting_errors_total") == 1
    assert m.get("vllm_longspec:proposer_tree_levels_total") == 5  # unknown keys pass through
    assert m.get("vllm_longspec:draft_ring_rows_in_use") == 3
    assert m.get("vllm_longspec:drafts_total") == 2
    assert m.get("vllm_longspec:accepted_tokens_total") == 2
    assert m.get("vllm_longspec:mean_acceptance_length") == 2.0
    assert m.get("vllm_longspec:requests_finished_total", reason="length") == 1
    assert m.get("vllm_longspec:info", num_speculative_tokens="3") == 1
