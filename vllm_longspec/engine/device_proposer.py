"""DeviceProposer: LongSpec drafting for vLLM's Model Runner V2, on the device, without syncs.

vLLM's V2 runner (the default on CUDA in vLLM 0.26) keeps every request's state on the GPU and
overlaps the host's scheduling of step N+1 with the GPU's execution of step N (async
scheduling). Its speculators get device tensors and return device tensors: the drafts never
visit the host. This class is LongSpec's drafting in that shape:

* a request's *slot* in the runner (its row of ``req_states``) is its row of the draft's ring;
* after a step, the runner has written the step's committed tokens into its token history and
  their count into the request's length; the ring update re-derives the last `span` committed
  positions from there (rewriting an already-written position is harmless: same token, same
  position, same K/V), so no host bookkeeping is needed;
* a step in which some request (re)started -- a new request's first token, a resumption after
  preemption -- rewrites the whole window (`span = window`), eagerly; every other step writes
  ``depth + 1`` positions per request (the most a step can commit) and, for batches up to a
  bucket size, runs ring update and drafting as ONE CUDA graph replay.

See `drafter` for the drafting itself and `compat.v2_runner` for the vLLM side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .draft_graphs import DraftInputs
from .drafter import LongSpecDrafter
from .prompt_lookup import lookup_continuations

logger = logging.getLogger("vllm.longspec")

_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Drafting logits of a graph bucket stay alive in the graph's pool: [B * widest level, vocab]
# fp32. Buckets whose logits exceed this are drafted eagerly.
GRAPH_LOGITS_BUDGET_BYTES = 256 << 20


@dataclass
class DeviceStep:
    """One engine step as the V2 runner leaves it after sampling (batch order).

    Attributes:
        slots: [B] int64 each request's slot (``req_states`` row; also its ring row).
        num_sampled: [B] int32 tokens the step committed (0: a prefill chunk that is not the
            last, or a request that produced nothing).
        committed: [B] int64 tokens of the request so far, this step's included.
        block_table: [B, max_blocks] int32 the target's block table (kernel blocks) of the
            last layer's KV-cache group.
        max_committed: host upper bound of ``committed`` (no device read needed).
        refill: some request (re)started this step: its whole window must be written.
    """

    slots: torch.Tensor
    num_sampled: torch.Tensor
    committed: torch.Tensor
    block_table: torch.Tensor
    max_committed: int
    refill: bool

    @property
    def batch_size(self) -> int:
        return int(self.slots.shape[0])


class DeviceProposer:
    """Ring update + drafting of a batch, device tensors in and out.

    Args:
        drafter: the loaded draft (its ring must have ``max_slots + 1`` rows: the last one
            absorbs the writes of padded and idle rows).
        token_history: [max_slots, max_model_len] int32 every request's tokens (vLLM's
            ``req_states.all_token_ids``; may live in host memory mapped into the device).
        max_model_len: the engine's limit (FlashAttention's ``max_seqlen_k`` inside graphs).
        use_graphs: capture per-bucket CUDA graphs (CUDA only).
        max_slots: the runner's request slots (``max_num_seqs``).
    """

    def __init__(self, drafter: LongSpecDrafter, token_history: torch.Tensor,
                 max_model_len: int, use_graphs: bool, max_slots: int):
        self.drafter = drafter
        self.token_history = token_history
        self.max_model_len = max_model_len
        self.window = drafter.config.window
        # The most a step can commit: every speculative token + the bonus token.
        self.decode_span = min(drafter.config.num_speculative_tokens + 1, self.window)
        self.idle_row = drafter.ring_rows - 1
        assert self.idle_row >= max_slots, "the ring needs one spare row"
        self.num_drafts = drafter.config.num_draft_tokens
        self.use_graphs = use_graphs
        self.max_graph_batch = self._max_graph_batch(max_slots)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._static: DeviceStep | None = None
        self._pool = None

    # ------------------------------------------------------------------ public
    def propose(self, step: DeviceStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts for every request of the step (rows of requests with ``num_sampled == 0``
        hold don't-care drafts).

        Returns:
            tokens [B, num_drafts] int64 (BFS order for trees), parents [B, num_drafts + 1]
            int64 (root -1; a chain's are -1, 0, 1, ...).
        """
        batch = step.batch_size
        if step.refill or not self._graph_covers(batch, step.block_table.shape[1]):
            span = self.window if step.refill else self.decode_span
            return self._step(step, span, min(step.max_committed, self.max_model_len))
        bucket = next(b for b in _BUCKETS if b >= batch)
        self._fill_static(step, bucket)
        entry = self._graphs.get(bucket)
        if entry is None:
            entry = self._capture(bucket)
        graph, tokens, parents = entry
        graph.replay()
        return tokens[:batch], parents[:batch]

    def capture(self, block_table_width: int, max_batch: int) -> None:
        """Captures the decode-step graphs of every bucket up to `max_batch` (from vLLM's
        ``capture_model``, so that serving never pays a capture)."""
        if not self.use_graphs:
            return
        self._allocate_static(block_table_width)
        for bucket in _BUCKETS:
            if bucket > min(max_batch, self.max_graph_batch):
                break
            if bucket not in self._graphs:
                self._capture(bucket)
        logger.info("LongSpec: captured drafting CUDA graphs for batch sizes %s",
                    sorted(self._graphs))

    # ------------------------------------------------------------------ the work
    def _step(self, step: DeviceStep, span: int, max_prefix: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring update over the last `span` committed positions, then the drafting."""
        device = step.slots.device
        live = step.num_sampled > 0                                            # [B]
        offsets = torch.arange(span, device=device) - span
        positions = step.committed.unsqueeze(1) + offsets                      # [B, S]
        writes = live.unsqueeze(1) & (positions >= 0)
        positions = positions.clamp(min=0)
        slots = step.slots.unsqueeze(1).expand_as(positions)
        token_ids = self.token_history[slots, positions].long()
        rows = torch.where(writes, slots, self.idle_row)
        self.drafter.write_ring(rows.reshape(-1), positions.reshape(-1), token_ids.reshape(-1))

        last = (step.committed - 1).clamp(min=0)
        inputs = DraftInputs(
            roots=self.token_history[step.slots, last].long(),
            ring_rows=torch.where(live, step.slots, self.idle_row),
            # An idle row sees one (garbage) slot rather than nothing: no NaNs, output dropped.
            ring_valid=torch.where(live, step.committed.clamp(max=self.window), 1),
            root_positions=last,
            # The target has cached K/V for every committed token but the newest.
            prefix_lens=torch.where(live, last, 0).to(torch.int32),
            block_table=step.block_table,
            prefix_lens_host=[max_prefix] * step.batch_size)
        tokens, parents = self.drafter.draft_tree(inputs, max_prefix)
        config = self.drafter.config
        if config.prompt_lookup_max > 0:  # chains only (LongSpecConfig)
            if tokens.shape[1] < self.num_drafts:  # draft_model_tokens: lookup-only positions
                # Where no copy reaches, repeat the last drafted token (any token is lossless).
                filler = tokens[:, -1:].expand(-1, self.num_drafts - tokens.shape[1])
                tokens = torch.cat([tokens, filler], dim=1)
            # max_prefix bounds the committed length of every request that sampled (the graphs'
            # is max_model_len); a request in the middle of a chunked prefill counts its whole
            # prompt as committed (vLLM's total_len) but drafts nothing: searched as empty.
            history = self.token_history[step.slots, :max(1, max_prefix)]
            copies, valid = lookup_continuations(
                history, torch.where(live, step.committed, 0), self.num_drafts,
                config.prompt_lookup_min, config.prompt_lookup_max)
            tokens = torch.where(valid, copies, tokens)
        return tokens, parents

    # ------------------------------------------------------------------ graphs
    def _max_graph_batch(self, max_slots: int) -> int:
        per_request = max(self.drafter.widths) * self.drafter.vocab_head.shard.size * 4
        fits = max(1, GRAPH_LOGITS_BUDGET_BYTES // per_request)
        return min(max_slots, fits)

    def _graph_covers(self, batch: int, table_width: int) -> bool:
        if not self.use_graphs or batch > self.max_graph_batch:
            return False
        if self._static is None:
            self._allocate_static(table_width)
        assert self._static is not None
        return self._static.block_table.shape[1] == table_width

    def _allocate_static(self, table_width: int) -> None:
        if self._static is not None:
            return
        n = next(b for b in _BUCKETS if b >= self.max_graph_batch)
        device = self.drafter.device
        self._static = DeviceStep(
            slots=torch.zeros(n, dtype=torch.int64, device=device),
            num_sampled=torch.zeros(n, dtype=torch.int32, device=device),
            committed=torch.ones(n, dtype=torch.int64, device=device),
            block_table=torch.zeros(n, table_width, dtype=torch.int32, device=device),
            max_committed=self.max_model_len, refill=False)

    def _view(self, bucket: int) -> DeviceStep:
        s = self._static
        assert s is not None
        return DeviceStep(slots=s.slots[:bucket], num_sampled=s.num_sampled[:bucket],
                          committed=s.committed[:bucket], block_table=s.block_table[:bucket],
                          max_committed=self.max_model_len, refill=False)

    def _fill_static(self, step: DeviceStep, bucket: int) -> None:
        s = self._static
        assert s is not None
        batch = step.batch_size
        s.slots[:batch].copy_(step.slots)
        s.num_sampled[:batch].copy_(step.num_sampled)
        s.committed[:batch].copy_(step.committed)
        s.block_table[:batch].copy_(step.block_table)
        if bucket > batch:  # padded rows: idle (nothing written, outputs dropped)
            s.num_sampled[batch:bucket].zero_()

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        view = self._view(bucket)
        device = self.drafter.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, autotuning)
            self._step(view, self.decode_span, self.max_model_len)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            tokens, parents = self._step(view, self.decode_span, self.max_model_len)
        self._graphs[bucket] = (graph, tokens, parents)
        return self._graphs[bucket]
