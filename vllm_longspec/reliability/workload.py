"""The request mix of one load round, reproducible from a seed.

Every request is a completion over prompt token ids (so outputs compare token for token without
a tokenizer round trip) with ``ignore_eos`` (so its length is known) and ``return_token_ids``.
A round mixes prompt lengths from a few tokens to nearly ``max_model_len``, prompts that share a
long prefix (prefix-cache hits, also across rounds), greedy and sampled requests, streaming and
not, and faults:

* ``disconnect``: a streaming client that closes the connection after a few chunks;
* ``abort``: a non-streaming client that gives up after a random delay (the server aborts the
  request wherever it is: queued, prefilling, or between draft and verification);
* ``max_model_len``: a prompt a few tokens short of ``max_model_len`` with more ``max_tokens``
  than fit, so generation stops at the limit while speculating;
* ``bad_request``: one of `bad_inputs.BAD_REQUESTS`, which must get an HTTP 4xx.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

FAULTS = ("disconnect", "abort", "max_model_len", "bad_request")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a round.

    Attributes:
        fault: None or one of `FAULTS`.
        fault_after: ``disconnect``: chunks read before closing; ``abort``: seconds waited.
        bad: the `bad_inputs.BAD_REQUESTS` case of a ``bad_request``.
    """

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    shared_prefix: bool = False
    fault: str | None = None
    fault_after: float = 0.0
    bad: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def must_match_reference(self) -> bool:
        """Greedy requests that run to completion must equal the reference token for token."""
        return self.greedy and self.fault in (None, "max_model_len")

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": list(self.prompt),
                                "max_tokens": self.max_tokens, "temperature": self.temperature,
                                "ignore_eos": True, "return_token_ids": True,
                                "stream": self.stream}
        if not self.greedy:
            body.update(top_p=self.top_p, seed=self.seed)
        return body

    def reference_key(self) -> tuple:
        """Requests with equal keys must produce equal greedy outputs."""
        return (self.prompt, self.max_tokens)


@dataclass(frozen=True)
class WorkloadConfig:
    """Shape of a round's request mix.

    Attributes:
        num_requests: requests per round (besides the ``max_model_len`` ones).
        max_model_len: the server's limit (prompts are sized against it).
        token_range: prompt token ids are drawn from [low, high) when no corpus is given.
        prompt_lengths: (low, high) length buckets, drawn with equal probability: short,
            medium, long. Lengths are clipped so that prompt + max_tokens fit.
        max_tokens: (low, high) inclusive range of ``max_tokens``.
        greedy_fraction: share of greedy requests; the rest sample at one of `temperatures`
            with a per-request seed.
        shared_prefix_len / shared_prefix_fraction: that share of requests starts with the
            same long prefix (the same in every round).
        disconnect_fraction, abort_fraction, bad_request_fraction: shares of faulty requests
            (each fault with a non-zero share occurs at least once per round).
        max_model_len_requests: requests per round that run into ``max_model_len``.
    """

    num_requests: int = 32
    max_model_len: int = 1024
    token_range: tuple[int, int] = (0, 256)
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 24), (48, 256), (256, 768))
    max_tokens: tuple[int, int] = (8, 48)
    greedy_fraction: float = 0.5
    temperatures: tuple[float, ...] = (0.6, 1.0)
    top_p: float = 0.95
    stream_fraction: float = 0.5
    shared_prefix_len: int = 320
    shared_prefix_fraction: float = 0.25
    disconnect_fraction: float = 0.1
    abort_fraction: float = 0.1
    bad_request_fraction: float = 0.06
    max_model_len_requests: int = 1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_max_model_len(cls, max_model_len: int, **overrides: Any) -> "WorkloadConfig":
        """Prompt lengths and the shared prefix scaled to `max_model_len` (short prompts stay
        short: below a typical ``min_prompt_len``)."""
        quarter = max(max_model_len // 4, 49)
        shape: dict[str, Any] = dict(
            max_model_len=max_model_len, shared_prefix_len=max_model_len // 3,
            prompt_lengths=((3, 24), (48, quarter), (quarter, max_model_len * 3 // 4)))
        shape.update(overrides)
        return cls(**shape)


@dataclass
class PromptSource:
    """Where prompt tokens come from: random ids in a range, or slices of a token corpus (e.g.
    real text tokenized by the server, for realistic acceptance on real models)."""

    token_range: tuple[int, int]
    corpus: Sequence[int] | None = None
    _offset: int = field(default=0, repr=False)

    def take(self, rng: random.Random, n: int) -> list[int]:
        if not self.corpus:
            low, high = self.token_range
            return [rng.randrange(low, high) for _ in range(n)]
        if n > len(self.corpus):
            raise ValueError(f"corpus has {len(self.corpus)} tokens, a prompt needs {n}")
        start = rng.randrange(0, len(self.corpus) - n + 1)
        return list(self.corpus[start:start + n])


def shared_prefix(config: WorkloadConfig, source: PromptSource) -> list[int]:
    """The long prefix shared by some requests of every round."""
    return source.take(random.Random(config.seed * 7919 + 1), config.shared_prefix_len)


def build_workload(config: WorkloadConfig, round_index: int = 0,
                   corpus: Sequence[int] | None = None,
                   bad_request_names: Sequence[str] = ()) -> list[RequestSpec]:
    """The requests of round `round_index` (shuffled: faults are spread over the round)."""
    rng = random.Random(config.seed * 1_000_003 + round_index)
    source = PromptSource(config.token_range, corpus)
    prefix = shared_prefix(config, source)
    requests: list[RequestSpec] = []
    low_tokens, high_tokens = config.max_tokens
    faults = _fault_slots(rng, config, bool(bad_request_names))
    for i, fault in enumerate(faults):
        rid = f"r{round_index}-{i:04d}"
        max_tokens = rng.randint(low_tokens, high_tokens)
        if fault == "bad_request":
            requests.append(RequestSpec(rid, tuple(source.take(rng, 8)), 4, fault=fault,
                                        bad=rng.choice(list(bad_request_names))))
            continue
        fault_after = 0.0
        if fault == "disconnect":
            fault_after = float(rng.randint(1, 4))
        elif fault == "abort":
            fault_after = round(rng.uniform(0.05, 1.5), 3)
            # Long enough to be still running when its client gives up (a short one may
            # finish first on a fast server, and the fault would never fire).
            max_tokens = max(max_tokens, min(8 * high_tokens, config.max_model_len // 2))
        room = config.max_model_len - max_tokens - 1
        if rng.random() < config.shared_prefix_fraction and config.shared_prefix_len < room:
            extra = rng.randint(1, max(1, min(64, room - config.shared_prefix_len)))
            prompt, shared = prefix + source.take(rng, extra), True
        else:
            low, high = rng.choice(config.prompt_lengths)
            high = max(min(high, room), 1)
            prompt, shared = source.take(rng, rng.randint(min(low, high), high)), False
        greedy = rng.random() < config.greedy_fraction
        stream = fault == "disconnect" or (fault != "abort"
                                           and rng.random() < config.stream_fraction)
        requests.append(RequestSpec(
            rid, tuple(prompt), max_tokens,
            temperature=0.0 if greedy else rng.choice(config.temperatures),
            top_p=1.0 if greedy else config.top_p,
            seed=None if greedy else rng.randrange(1 << 30), stream=stream,
            shared_prefix=shared, fault=fault, fault_after=fault_after))
    for j in range(config.max_model_len_requests):
        short_by = rng.randint(4, 20)
        requests.append(RequestSpec(
            f"r{round_index}-limit{j}", tuple(source.take(rng, config.max_model_len - short_by)),
            max_tokens=short_by + 32, stream=rng.random() < 0.5, fault="max_model_len"))
    rng.shuffle(requests)
    return requests


def _fault_slots(rng: random.Random, config: WorkloadConfig,
                 bad_requests: bool) -> list[str | None]:
    """The fault of each request of a round, in random order: every fault with a non-zero
    share occurs at least once (so a small round still exercises all of them)."""
    slots: list[str | None] = []
    for fault, share in (("bad_request", config.bad_request_fraction if bad_requests else 0.0),
                         ("disconnect", config.disconnect_fraction),
                         ("abort", config.abort_fraction)):
        if share > 0:
            slots += [fault] * max(1, round(share * config.num_requests))
    if len(slots) > config.num_requests:
        raise ValueError(f"{len(slots)} faulty requests do not fit in a round of "
                         f"{config.num_requests}")
    slots += [None] * (config.num_requests - len(slots))
    rng.shuffle(slots)
    return slots


def probe_request(config: WorkloadConfig, corpus: Sequence[int] | None = None,
                  length: int = 40) -> RequestSpec:
    """A fixed greedy request sent after every round: the server still answers, identically.
    Make it longer than the server's ``min_prompt_len`` so that it drafts."""
    source = PromptSource(config.token_range, corpus)
    return RequestSpec("probe", tuple(source.take(random.Random(config.seed + 99), length)), 16)
