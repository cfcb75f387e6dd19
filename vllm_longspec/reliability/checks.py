"""Verdicts on single requests: served, lost, corrupted, or a bad request not refused.

* lost: a request that should have been served was not (no answer, HTTP error, error event,
  missing tokens);
* corrupted: an answer that is wrong: a greedy output (or, for a disconnected stream, the part
  received) that differs from the server without speculation, a wrong length or finish reason,
  token ids outside the vocabulary;
* not_refused: a bad request that did not get the expected HTTP 4xx.
Requests whose client gave up on purpose (``disconnect`` / ``abort`` that fired) only have to
be consistent up to where they stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bad_inputs import BAD_REQUESTS, judge
from .client import RequestResult
from .workload import RequestSpec

SERVED, LOST, CORRUPTED, NOT_REFUSED, REFUSED, CUT_SHORT = (
    "served", "lost", "corrupted", "not_refused", "refused", "cut_short")


@dataclass
class Verdict:
    """`outcome` is one of served, refused (a bad request, as expected), cut_short (the client
    disconnected or aborted on purpose), lost, corrupted, not_refused."""

    request_id: str
    outcome: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in (SERVED, REFUSED, CUT_SHORT)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def judge_request(spec: RequestSpec, result: RequestResult, reference: list[int] | None,
                  max_model_len: int, vocab_size: int | None = None) -> Verdict:
    """The verdict on one request; `reference` is the plain server's greedy output."""
    rid = spec.request_id
    if spec.fault == "bad_request":
        case = BAD_REQUESTS[spec.bad]
        if judge(case, result.status, result.error):
            return Verdict(rid, REFUSED)
        return Verdict(rid, NOT_REFUSED, f"{spec.bad}: HTTP {result.status}: {result.error}")
    if result.error is not None or (result.status is not None and result.status != 200):
        return Verdict(rid, LOST, f"HTTP {result.status}: {result.error}")
    tokens = result.token_ids
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in tokens):
        return Verdict(rid, CORRUPTED, "token id outside the vocabulary")
    if spec.greedy and reference is not None:
        if tokens != reference[:len(tokens)]:
            return Verdict(rid, CORRUPTED, f"greedy output differs from the server without "
                                           f"speculation at token {first_difference(tokens, reference)}")
    if result.disconnected:
        return Verdict(rid, CUT_SHORT, f"client left after {len(tokens)} tokens")
    if result.status is None:
        return Verdict(rid, LOST, "no response")
    if result.finish_reason != "length":
        return Verdict(rid, CORRUPTED, f"finish_reason {result.finish_reason!r}, expected "
                                       "'length' (ignore_eos)")
    if spec.fault == "max_model_len":
        expected = max_model_len - len(spec.prompt)
    else:
        expected = spec.max_tokens
    if len(tokens) != expected:
        return Verdict(rid, LOST if len(tokens) < expected else CORRUPTED,
                       f"{len(tokens)} tokens, expected {expected}")
    if spec.greedy and reference is not None and len(reference) != len(tokens):
        return Verdict(rid, CORRUPTED, f"{len(tokens)} tokens, the reference has "
                                       f"{len(reference)}")
    return Verdict(rid, SERVED)
