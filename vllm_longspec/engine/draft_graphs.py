"""CUDA graphs for the drafting of all tree levels (chains are trees of width 1).

Drafting a tree is a few hundred small kernels (five levels of: embedding, one decoder layer
with two attentions, the lm_head, a global top-w). Launched one by one from Python they cost
far more host time than GPU time (measured on an H100, Qwen2.5-1.5B shape at 16k: ~25 ms of
host work per step against ~3 ms of kernels). The drafting has static shapes for a given
batch size (the tree's widths fix every level's size), reads only persistent tensors (the
draft's weights, its ring buffers, the target's paged KV cache), and has no host syncs, so it
is captured once per batch-size bucket and replayed: one launch per step.

Inputs are copied into static buffers first (one host-to-device copy); padded rows of a bucket
read row 0 of everything with nothing visible, and their outputs are dropped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger("vllm.longspec")

# Buckets above this are drafted eagerly: the graph pool keeps the largest bucket's logits
# ([B * widest level, vocab] fp32) alive, memory vLLM's profiler has not planned for, and at
# large batch sizes the host cost is shared by many requests anyway.
MAX_GRAPH_BATCH = 8
_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def draft_graphs_enabled(device: torch.device, enforce_eager: bool, tensor_parallel: bool) -> bool:
    """CUDA graphs for drafting: on CUDA, unless the engine runs eagerly, under tensor
    parallelism (collectives inside the drafting), or ``LONGSPEC_DRAFT_CUDAGRAPHS=0``."""
    if os.environ.get("LONGSPEC_DRAFT_CUDAGRAPHS", "1") == "0":
        return False
    return device.type == "cuda" and not enforce_eager and not tensor_parallel


@dataclass
class DraftInputs:
    """What drafting needs per request (batch order).

    Attributes:
        roots: [B] int64, the last committed token.
        ring_rows: [B] int64, the request's row of the draft ring.
        ring_valid: [B] int64, filled slots of that row.
        root_positions: [B] int64, the root's position.
        prefix_lens: [B] int32, tokens with target K/V in the paged cache.
        block_table: [B, max_blocks] int32, the request's blocks.
        prefix_lens_host: the same prefix lengths as Python ints.
    """

    roots: torch.Tensor
    ring_rows: torch.Tensor
    ring_valid: torch.Tensor
    root_positions: torch.Tensor
    prefix_lens: torch.Tensor
    block_table: torch.Tensor
    prefix_lens_host: list[int]

    @classmethod
    def from_requests(cls, *, roots: list[int], ring_rows: list[int], ring_valid: list[int],
                      root_positions: list[int], prefix_lens: list[int],
                      block_table: torch.Tensor) -> "DraftInputs":
        """Host tensors for the per-request values; the block table stays where it is."""
        packed = torch.tensor([roots, ring_rows, ring_valid, root_positions, prefix_lens],
                              dtype=torch.int64)
        return cls(roots=packed[0], ring_rows=packed[1], ring_valid=packed[2],
                   root_positions=packed[3], prefix_lens=packed[4],
                   block_table=block_table.to(torch.int32), prefix_lens_host=list(prefix_lens))

    @property
    def batch_size(self) -> int:
        return len(self.prefix_lens_host)

    def to(self, device: torch.device) -> "DraftInputs":
        packed = torch.stack([self.roots, self.ring_rows, self.ring_valid, self.root_positions,
                              self.prefix_lens]).to(device, non_blocking=True)
        return DraftInputs(roots=packed[0], ring_rows=packed[1], ring_valid=packed[2],
                           root_positions=packed[3], prefix_lens=packed[4].to(torch.int32),
                           block_table=self.block_table.to(device),
                           prefix_lens_host=self.prefix_lens_host)


DraftFn = Callable[[DraftInputs, int], tuple[torch.Tensor, torch.Tensor]]


class DraftCudaGraphs:
    """Captures `draft_fn(inputs, max_prefix_len)` per batch-size bucket and replays it.

    Args:
        draft_fn: the drafting of all levels on device tensors, without host syncs.
        max_prefix_len: ``max_model_len`` (FlashAttention's ``max_seqlen_k`` bound inside the
            graph; the true lengths are read from ``prefix_lens`` at replay).
        device: the CUDA device.
    """

    def __init__(self, draft_fn: DraftFn, max_prefix_len: int, device: torch.device,
                 max_batch: int = MAX_GRAPH_BATCH):
        self.draft_fn = draft_fn
        self.max_prefix_len = max_prefix_len
        self.device = device
        self.max_batch = max_batch
        self._static: DraftInputs | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self._failed = False

    def covers(self, inputs: DraftInputs) -> bool:
        if self._failed or inputs.batch_size > self.max_batch:
            return False
        static = self._static
        return static is None or static.block_table.shape[1] == inputs.block_table.shape[1]

    @staticmethod
    def bucket(batch_size: int) -> int:
        return next(b for b in _BUCKETS if b >= batch_size)

    def run(self, inputs: DraftInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, N], parents [B, N+1]) for the B requests of `inputs`."""
        batch = inputs.batch_size
        bucket = self.bucket(batch)
        self._fill(inputs, bucket)
        entry = self._graphs.get(bucket)
        if entry is None:
            entry = self._capture(bucket)
            if entry is None:  # capture failed: eager from now on (logged once)
                static = self._view(bucket)
                tokens, parents = self.draft_fn(static, self.max_prefix_len)
                return tokens[:batch], parents[:batch]
        graph, tokens, parents = entry
        graph.replay()
        return tokens[:batch], parents[:batch]

    # ------------------------------------------------------------------ internals
    def _allocate(self, table_width: int) -> None:
        def buffer(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        n = self.max_batch
        self._static = DraftInputs(
            roots=buffer(torch.int64, n), ring_rows=buffer(torch.int64, n),
            ring_valid=buffer(torch.int64, n), root_positions=buffer(torch.int64, n),
            prefix_lens=buffer(torch.int32, n), block_table=buffer(torch.int32, n, table_width),
            prefix_lens_host=[self.max_prefix_len] * n)
        self._packed = buffer(torch.int64, 5, n)

    def _view(self, bucket: int) -> DraftInputs:
        s = self._static
        assert s is not None
        return DraftInputs(roots=s.roots[:bucket], ring_rows=s.ring_rows[:bucket],
                           ring_valid=s.ring_valid[:bucket],
                           root_positions=s.root_positions[:bucket],
                           prefix_lens=s.prefix_lens[:bucket],
                           block_table=s.block_table[:bucket],
                           prefix_lens_host=s.prefix_lens_host[:bucket])

    def _fill(self, inputs: DraftInputs, bucket: int) -> None:
        if self._static is None:
            self._allocate(inputs.block_table.shape[1])
        s = self._static
        assert s is not None
        batch = inputs.batch_size
        host = torch.stack([inputs.roots, inputs.ring_rows, inputs.ring_valid,
                            inputs.root_positions, inputs.prefix_lens])
        self._packed[:, :batch].copy_(host, non_blocking=True)
        # Padded rows: ring row 0, nothing visible, no prefix.
        self._packed[:, batch:bucket].zero_()
        s.roots.copy_(self._packed[0])
        s.ring_rows.copy_(self._packed[1])
        s.ring_valid.copy_(self._packed[2])
        s.root_positions.copy_(self._packed[3])
        s.prefix_lens.copy_(self._packed[4])
        s.block_table[:batch].copy_(inputs.block_table)

    def _capture(self, bucket: int):
        static = self._view(bucket)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits)
                self.draft_fn(static, self.max_prefix_len)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                tokens, parents = self.draft_fn(static, self.max_prefix_len)
        except Exception as exc:  # drafting works eagerly; only the speed-up is lost
            logger.warning("LongSpec: capturing the drafting CUDA graph failed (%s: %s); "
                           "drafting eagerly", type(exc).__name__, exc)
            self._failed = True
            return None
        logger.info("LongSpec: captured the drafting CUDA graph for batch size %d", bucket)
        self._graphs[bucket] = (graph, tokens, parents)
        return self._graphs[bucket]
