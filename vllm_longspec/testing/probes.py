"""Looks inside a running engine's workers (every TP rank) for tests.

`DrafterProbe` is a vLLM worker extension (``LLM(..., worker_extension_cls=PROBE)``): its methods
join the worker class and are called on every rank by name through ``LLM.collective_rpc``.
``longspec_install_digest`` wraps the rank's LongSpec drafter so that it records, per request,
the sequence of drafts it proposed; ``longspec_report`` reads back a digest of those sequences and
the drafter's counters. Two runs (or two ranks) that drafted the same tokens for the same requests
have the same digest, whatever the batch order or step composition (which depend on when the
engine core saw each request arrive).
"""

from __future__ import annotations

import hashlib
from typing import Any

PROBE = "vllm_longspec.testing.probes.DrafterProbe"


class DrafterProbe:
    """Worker extension (mixed into vLLM's worker class; ``self`` is the worker)."""

    def _longspec_drafter(self) -> Any:
        drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
        if not getattr(drafter, "is_longspec_proposer", False):
            raise RuntimeError("no LongSpec drafter in this worker")
        return drafter

    def longspec_install_digest(self) -> None:
        """``drafter.propose`` also records what it returns for each request id."""
        drafter = self._longspec_drafter()
        if hasattr(drafter, "_probe_drafts"):
            return
        original = drafter.propose
        drafter._probe_drafts = {}

        def propose(*args: Any, **kwargs: Any) -> list[list[int]]:
            req_ids = list(drafter._step.req_ids) if drafter._step is not None else []
            drafts = original(*args, **kwargs)
            for req_id, draft in zip(req_ids, drafts):
                if draft:
                    drafter._probe_drafts.setdefault(req_id, []).append(
                        [int(t) for t in draft])
            return drafts

        drafter.propose = propose

    def longspec_report(self) -> dict[str, Any]:
        """This rank's TP rank, draft digest and token count, ring KV heads, and the drafter's
        and tree verifier's counters."""
        drafter = self._longspec_drafter()
        comm = getattr(getattr(drafter, "vocab_head", None), "comm", None)
        verifier = drafter.tree_verifier
        per_request = sorted(repr(seq) for seq in drafter._probe_drafts.values())
        return {"rank": 0 if comm is None else comm.rank,
                "digest": hashlib.sha256(repr(per_request).encode()).hexdigest(),
                "draft_tokens": sum(len(d) for seq in drafter._probe_drafts.values()
                                    for d in seq),
                "per_request": per_request,
                "stats": dict(drafter.stats),
                "tree_stats": dict(verifier.stats) if verifier is not None else {},
                "ring_kv_heads": int(drafter.ring.k.shape[2])}


def before_digest(llm: Any) -> None:
    llm.collective_rpc("longspec_install_digest")


def after_report(llm: Any) -> list[dict[str, Any]]:
    """One report per worker, in rank order."""
    return sorted(llm.collective_rpc("longspec_report"), key=lambda r: r["rank"])
