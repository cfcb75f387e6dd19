"""`vllm serve` and `vllm-longspec serve` with --speculative-model longspec: real OpenAI servers
on 127.0.0.1 answer completions; bad configurations stop the start with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

SERVER_ARGS = ["--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024",
               "--enforce-eager", "--max-num-seqs", "4", "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(name: str) -> list[str]:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"console script {name!r} is not installed (pip install the package)")
    return [exe]


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return resp.read().decode()


class Server:
    def __init__(self, command: list[str], log_path: str):
        self.port = _free_port()
        self.log = open(log_path, "w")
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command + ["--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.log_path = log_path

    def wait_ready(self, timeout: float = 400.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                _get(self.port, "/health")
                return
            except OSError:
                time.sleep(1.0)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        with open(self.log_path) as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()


def _serve(tmp_path, tiny_models, launcher: list[str], name: str) -> dict:
    target, draft = tiny_models["bigram_llama"], tiny_models["zero_draft_llama"]
    server = Server(launcher + ["serve", target, "--speculative-model", "longspec",
                                "--longspec-draft", draft, "--num-speculative-tokens", "3",
                                *SERVER_ARGS], str(tmp_path / f"{name}.log"))
    try:
        server.wait_ready()
        body = {"model": target, "prompt": "def fibonacci(n):", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True}
        out = _post(server.port, "/v1/completions", body)
        _abandon_stream(server.port, dict(body, max_tokens=400, stream=True))
        again = _post(server.port, "/v1/completions", body)
        metrics = _get(server.port, "/metrics")
    finally:
        server.stop()
    return {"completion": out, "again": again, "metrics": metrics,
            "log": server.tail(200000)}


def _abandon_stream(port: int, body: dict) -> None:
    """A client that disconnects mid-stream (its request is aborted while speculating)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.readline()
    conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("servers")
    return {
        "vllm-longspec": _serve(tmp, tiny_models, _cli("vllm-longspec"), "longspec"),
        "vllm": _serve(tmp, tiny_models, _cli("vllm"), "vllm"),
    }


@pytest.mark.parametrize("launcher", ["vllm-longspec", "vllm"])
def test_server_answers_completion_with_longspec(served, launcher):
    result = served[launcher]
    choice = result["completion"]["choices"][0]
    assert choice["finish_reason"] == "length"
    assert result["completion"]["usage"]["completion_tokens"] == 24
    assert len(choice["text"]) > 0
    # vLLM's own spec-decode metrics: drafts were made and (bigram fixture) all accepted
    drafts = [l for l in result["metrics"].splitlines()
              if l.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0, result["log"][-3000:]
    assert "custom_class" in result["log"] or "LongSpec" in result["log"]


def test_server_survives_a_client_disconnect(served):
    for result in served.values():
        assert result["again"]["choices"][0]["text"] == result["completion"]["choices"][0]["text"]


def test_both_launchers_agree(served):
    texts = {k: v["completion"]["choices"][0]["text"] for k, v in served.items()}
    assert texts["vllm"] == texts["vllm-longspec"]


def _expect_refusal(command: list[str], message: str) -> None:
    """Runs a server command that must exit non-zero, before serving, naming the problem."""
    proc = subprocess.Popen(command + ["--port", str(_free_port())], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        pytest.fail(f"the server did not refuse to start:\n{output[-3000:]}")
    assert proc.returncode != 0
    assert message in output, output[-3000:]


@pytest.mark.parametrize("extra, message", [
    (["--longspec-window", "0"], "window=0 is out of range"),
    (["--longspec-tree-widths", "64,64,64", "--num-speculative-tokens", "3"], "tree too big"),
])
def test_bad_config_refuses_to_start(tiny_models, extra, message):
    target, draft = tiny_models["bigram_llama"], tiny_models["zero_draft_llama"]
    _expect_refusal(_cli("vllm-longspec") + [
        "serve", target, "--speculative-model", "longspec", "--longspec-draft", draft,
        *extra, *SERVER_ARGS], message)


def test_draft_for_another_target_refuses_to_start(tmp_path, tiny_models):
    from vllm_longspec.testing.fixtures import make_tiny_draft

    other_target = tmp_path / "other_target"
    other_target.mkdir()
    with open(os.path.join(tiny_models["qwen"], "config.json")) as f:
        config = json.load(f)
    config.update(vocab_size=512, num_key_value_heads=4)
    with open(other_target / "config.json", "w") as f:
        json.dump(config, f)
    draft = make_tiny_draft(str(tmp_path / "other_draft"), str(other_target))
    _expect_refusal(_cli("vllm") + ["serve", tiny_models["qwen"], "--speculative-model", draft,
                                    *SERVER_ARGS], "made for another target")
