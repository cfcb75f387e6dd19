"""Bounded-concurrency load: at most `concurrency` requests in flight, with a progress bar."""

from __future__ import annotations

import asyncio
from typing import Sequence

from .client import RequestResult, new_session, send
from .workload import RequestSpec


async def run_requests(base_url: str, model: str, requests: Sequence[RequestSpec], *,
                       concurrency: int, max_model_len: int, desc: str = "requests",
                       progress: bool = True, timeout_s: float = 600.0) -> list[RequestResult]:
    """Sends `requests` (in order, `concurrency` at a time); results come back in input order."""
    from tqdm.auto import tqdm

    limiter = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
    async with new_session(concurrency) as session:

        async def one(spec: RequestSpec) -> RequestResult:
            async with limiter:
                result = await send(session, base_url, model, spec, max_model_len, timeout_s)
            bar.update(1)
            return result

        try:
            return list(await asyncio.gather(*(one(spec) for spec in requests)))
        finally:
            bar.close()


def run_load(base_url: str, model: str, requests: Sequence[RequestSpec], *, concurrency: int,
             max_model_len: int, desc: str = "requests", progress: bool = True,
             timeout_s: float = 600.0) -> list[RequestResult]:
    """Synchronous `run_requests` (its own event loop)."""
    return asyncio.run(run_requests(base_url, model, requests, concurrency=concurrency,
                                    max_model_len=max_model_len, desc=desc, progress=progress,
                                    timeout_s=timeout_s))
