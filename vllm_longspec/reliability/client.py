"""Sends one `RequestSpec` to an OpenAI-compatible server and records what came back.

Streaming responses are read chunk by chunk (server-sent events); the generated token ids are
the concatenation of the chunks' ``token_ids``. Faults are acted out here: a ``disconnect``
closes the connection after `fault_after` chunks, an ``abort`` gives up after `fault_after`
seconds. Connections are never reused, so closing one is seen by the server as a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from .bad_inputs import BAD_REQUESTS
from .workload import RequestSpec


@dataclass
class RequestResult:
    """The outcome of one request.

    Attributes:
        status: HTTP status, None when no response arrived (connection refused, or the client
            gave up first).
        token_ids: generated tokens (all chunks of a stream).
        error: the server's error message (HTTP error or an error event inside a stream), or
            the client-side failure.
        disconnected: the client closed the connection on purpose (a ``disconnect`` after its
            chunks, an ``abort`` before the answer came).
    """

    request_id: str
    status: int | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    chunks: int = 0
    latency_s: float = 0.0
    disconnected: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_session(limit: int) -> aiohttp.ClientSession:
    """A session whose connections close after every request (`limit` at once)."""
    connector = aiohttp.TCPConnector(limit=limit, force_close=True)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))


def error_message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return text[:500]


async def send(session: aiohttp.ClientSession, base_url: str, model: str, spec: RequestSpec,
               max_model_len: int, timeout_s: float = 600.0) -> RequestResult:
    """Sends `spec` and returns its result; never raises for server-side problems."""
    result = RequestResult(spec.request_id)
    path, payload = "/v1/completions", json.dumps(spec.body(model)).encode()
    if spec.fault == "bad_request":
        case = BAD_REQUESTS[spec.bad]
        path, payload = case.path, case.payload(model, max_model_len)
    start = time.perf_counter()
    task = _exchange(session, base_url + path, payload, spec, result)
    try:
        if spec.fault == "abort":
            await asyncio.wait_for(task, timeout=spec.fault_after)
        else:
            await asyncio.wait_for(task, timeout=timeout_s)
    except asyncio.TimeoutError:
        if spec.fault == "abort":
            result.disconnected = True
        else:
            result.error = f"client timeout after {timeout_s:.0f}s"
    except aiohttp.ClientError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency_s = time.perf_counter() - start
    return result


async def _exchange(session: aiohttp.ClientSession, url: str, payload: bytes,
                    spec: RequestSpec, result: RequestResult) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=payload, headers=headers) as resp:
        result.status = resp.status
        if resp.status != 200:
            result.error = error_message(await resp.text())
            return
        if not spec.stream or spec.fault == "bad_request":
            _take_completion(json.loads(await resp.text()), result)
            return
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result.error = error_message(data.decode())
                break
            _take_completion(event, result)
            result.chunks += 1
            if spec.fault == "disconnect" and result.chunks >= spec.fault_after:
                result.disconnected = True
                resp.close()  # drop the connection mid-stream
                return


def _take_completion(data: dict[str, Any], result: RequestResult) -> None:
    choice = data["choices"][0]
    result.token_ids.extend(choice.get("token_ids") or [])
    result.finish_reason = choice.get("finish_reason") or result.finish_reason
    usage = data.get("usage") or {}
    if usage.get("prompt_tokens") is not None:
        result.prompt_tokens = usage["prompt_tokens"]
