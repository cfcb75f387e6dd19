"""Requests a server must refuse with an HTTP 4xx and a message naming the problem.

Each case starts from a small valid completion request and breaks one thing: an out-of-range
sampling parameter, a prompt over ``max_model_len``, token ids outside the vocabulary, a body
that is not JSON, an unknown model, sampling options vLLM does not support with speculation.
`run_bad_requests` sends each once and checks the status and message; the load rounds also mix
them into regular traffic, where they must not disturb anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp


@dataclass(frozen=True)
class BadRequest:
    """One bad request.

    Attributes:
        expect: a phrase the error message must contain (case-insensitive).
        status: the expected HTTP status (any 4xx when None).
        speculation_only: refused only by a speculative server (vLLM does not support these
            sampling options with speculative decoding; a plain server accepts them).
        build: (model, max_model_len) -> JSON body, or raw bytes for a body that is not JSON.
    """

    name: str
    what: str
    expect: str
    build: Callable[[str, int], Any]
    path: str = "/v1/completions"
    status: int | None = None
    speculation_only: bool = False

    def payload(self, model: str, max_model_len: int) -> bytes:
        body = self.build(model, max_model_len)
        return body if isinstance(body, bytes) else json.dumps(body).encode()


def _completion(**overrides: Any) -> Callable[[str, int], dict]:
    def build(model: str, max_model_len: int) -> dict:
        body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 4}
        body.update({k: (v(max_model_len) if callable(v) else v) for k, v in overrides.items()})
        return body
    return build


def _nan_temperature(model: str, max_model_len: int) -> bytes:
    # JSON has no NaN; Python's parser (and vLLM's) accepts the bare literal
    return (f'{{"model": {json.dumps(model)}, "prompt": [5, 6], "max_tokens": 4, '
            f'"temperature": NaN}}').encode()


BAD_REQUEST_LIST = [
    BadRequest("negative_temperature", "temperature -1", "temperature",
               _completion(temperature=-1.0)),
    BadRequest("nan_temperature", "temperature NaN", "temperature", _nan_temperature),
    BadRequest("huge_temperature", "temperature 1e30", "temperature",
               _completion(temperature=1e30)),
    BadRequest("top_p_above_one", "top_p 2", "top_p", _completion(top_p=2.0)),
    BadRequest("negative_top_k", "top_k -7", "top_k", _completion(top_k=-7)),
    BadRequest("zero_max_tokens", "max_tokens 0", "max_tokens", _completion(max_tokens=0)),
    BadRequest("max_tokens_over_max_model_len", "max_tokens beyond max_model_len", "max_tokens",
               _completion(max_tokens=lambda n: n + 1000)),
    BadRequest("zero_n", "n 0", "n must be", _completion(n=0)),
    BadRequest("presence_penalty_out_of_range", "presence_penalty 9", "presence_penalty",
               _completion(presence_penalty=9.0)),
    BadRequest("too_many_logprobs", "logprobs 100000", "logprobs",
               _completion(logprobs=100000)),
    BadRequest("seed_not_integer", 'seed "x"', "seed", _completion(seed="x")),
    BadRequest("prompt_over_max_model_len", "prompt longer than max_model_len",
               "maximum context length",
               _completion(prompt=lambda n: [5] * (n + 100))),
    BadRequest("token_out_of_vocabulary", "prompt token id 99999999", "out of vocabulary",
               _completion(prompt=[5, 99_999_999])),
    BadRequest("negative_token", "prompt token id -1", "greater than or equal to 0",
               _completion(prompt=[5, -1])),
    BadRequest("empty_prompt", "prompt []", "prompt", _completion(prompt=[])),
    BadRequest("body_not_json", "a truncated JSON body", "",
               lambda model, n: b'{"model": "x", "prompt": [1, 2'),
    BadRequest("unknown_model", "a model the server does not serve", "does not exist",
               _completion(model="no-such-model"), status=404),
    BadRequest("chat_messages_not_a_list", "chat messages given as a string", "messages",
               lambda model, n: {"model": model, "messages": "hello", "max_tokens": 4},
               path="/v1/chat/completions"),
    BadRequest("logit_bias_with_speculation", "logit_bias (unsupported with speculation)",
               "speculative decoding", _completion(logit_bias={"5": 1.0}),
               speculation_only=True),
    BadRequest("min_p_with_speculation", "min_p (unsupported with speculation)",
               "speculative decoding", _completion(min_p=0.1), speculation_only=True),
]
BAD_REQUESTS = {case.name: case for case in BAD_REQUEST_LIST}


def bad_request_names(speculative: bool) -> list[str]:
    """The cases a server with (or without) speculation must refuse."""
    return [c.name for c in BAD_REQUEST_LIST if speculative or not c.speculation_only]


@dataclass
class BadRequestResult:
    name: str
    what: str
    status: int | None
    message: str
    refused_as_expected: bool


def judge(case: BadRequest, status: int | None, message: str | None) -> bool:
    """Whether a response is the refusal `case` expects."""
    if status is None or not 400 <= status < 500:
        return False
    if case.status is not None and status != case.status:
        return False
    return case.expect.lower() in (message or "").lower()


async def run_bad_requests(base_url: str, model: str, max_model_len: int,
                           speculative: bool = True) -> list[BadRequestResult]:
    """Sends every applicable case once, one after the other."""
    from .client import error_message

    results = []
    async with aiohttp.ClientSession() as session:
        for name in bad_request_names(speculative):
            case = BAD_REQUESTS[name]
            async with session.post(base_url + case.path, data=case.payload(model, max_model_len),
                                    headers={"Content-Type": "application/json"}) as resp:
                status, text = resp.status, await resp.text()
            message = error_message(text) if status != 200 else ""
            results.append(BadRequestResult(name, case.what, status, message,
                                            judge(case, status, message)))
    return results
