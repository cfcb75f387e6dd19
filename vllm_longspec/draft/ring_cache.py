"""The draft's own KV cache: a ring of `window` slots per request, constant in context length.

Position p of a request lives in slot ``p % window`` of the request's row. Only committed tokens
are written (speculative tokens' K/V stay in per-step scratch), so a rejected draft never
overwrites a slot that a later query still needs. Rows are handed out per request id; a row is
rebuilt from token ids whenever its request comes back without it (after preemption or
eviction), which costs one small projection of at most `window` tokens.
"""

from __future__ import annotations

import torch


class DraftKVRing:
    """Ring buffers for `max_rows` requests: ``k``/``v`` are [max_rows, window, Hk, D]."""

    def __init__(self, max_rows: int, window: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.window = window
        self.k = torch.zeros(max_rows, window, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._row_of: dict[str, int] = {}
        self._filled: dict[str, int] = {}  # positions [0, filled) have been written
        self._free = list(range(max_rows - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def nbytes_per_request(self) -> int:
        return self.nbytes // self.k.shape[0]

    @property
    def rows_in_use(self) -> int:
        """Rows held by requests (those of finished requests are released at the next
        drafting step)."""
        return len(self._row_of)

    def rows(self, req_ids: list[str], keep: set[str]) -> list[int]:
        """Rows of `req_ids`, allocating new ones. Rows of requests outside `keep` (the
        runner's batch) are released first: such requests finished, were aborted or were
        preempted (a preempted request's row is rebuilt when it comes back)."""
        stale = [r for r in self._row_of if r not in keep]
        if stale:
            self.release(stale)
        out = []
        for req_id in req_ids:
            row = self._row_of.get(req_id)
            if row is None:
                if not self._free:
                    raise RuntimeError("LongSpec draft ring: more requests than max_num_seqs rows")
                row = self._free.pop()
                self._row_of[req_id] = row
                self._filled[req_id] = 0
            out.append(row)
        return out

    def filled(self, req_id: str) -> int:
        return self._filled.get(req_id, 0)

    def mark_filled(self, req_id: str, upto: int) -> None:
        self._filled[req_id] = upto

    def release(self, req_ids) -> None:
        for req_id in list(req_ids):
            row = self._row_of.pop(req_id, None)
            self._filled.pop(req_id, None)
            if row is not None:
                self._free.append(row)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Stores K/V of committed tokens.

        Args:
            rows: [N] ring row of each token.
            positions: [N] absolute position of each token (slot = position % window). Within
                one row no two positions may share a slot (write at most `window` per row).
            k, v: [N, Hk, D].
        """
        slots = positions % self.window
        self.k[rows, slots] = k.to(self.k.dtype)
        self.v[rows, slots] = v.to(self.v.dtype)

    def valid_counts(self, req_ids: list[str]) -> list[int]:
        return [min(self._filled.get(r, 0), self.window) for r in req_ids]
