"""The training loop: optimizer, schedule, DDP, resumable checkpoints, progress, summary.

Only the draft layer trains (fp32 master weights; bf16 autocast when the target runs in bf16);
the target is frozen and shared (embedding, RoPE, last-layer K/V, lm_head).

Output folder:
    config.json, model.safetensors   the final draft, published layout (``--speculative-model``)
    checkpoint/state.pt              resume state: draft, optimizer, scheduler, step, RNG
    train_summary.json               the summary printed at the end

Every random choice of a step (its sequences, lag, anchor-offset positions) is drawn from
generators seeded by (seed, step, rank, micro-batch), so a resumed run repeats the interrupted
one exactly (tests/unit/test_train.py checks it bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from ..draft.checkpoint import (build_draft_layer, check_draft_fits_target, load_draft_checkpoint,
                                save_draft_checkpoint)
from ..draft.vocab import count_tokens, save_token_counts
from ..draft.model import LongSpecDraftLayer, init_draft_weights
from .data import SequenceSampler, build_data
from .dist import (DistInfo, barrier, gather_objects, mean_across_ranks, setup_distributed,
                   teardown_distributed, weights_digest, wrap_draft_ddp)
from .errors import TrainError
from .forward import draft_forward
from .long_eval import DEFAULT_TAIL, LongPrefixEval, format_long_eval, load_windows
from .loss import lm_loss, next_token_labels
from .metrics import evaluate_short_long
from .positions import DEFAULT_THRESHOLD, anchor_offset_positions
from .target_kv import FrozenTarget

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
SUMMARY_FILE = "train_summary.json"
DEFAULT_WINDOW = 512
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags map one to one (see cli.py for the help texts)."""

    target: str
    data: list[str]
    output: str
    steps: int
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None          # None: 10 % of the steps
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    window: int | None = None          # None: the --init-draft's window, else 512
    max_lag: int = 5
    loss: str = "ce"
    anchor_offset: bool = True
    anchor_threshold: int = DEFAULT_THRESHOLD
    eval_every: int = 200
    eval_tokens: int = 32768
    eval_long_offset: int = 16384
    eval_long_data: list[str] | None = None  # real long-prefix evaluation (long_eval.py)
    eval_long_len: list[int] = field(default_factory=lambda: [16384])
    eval_long_tail: int = DEFAULT_TAIL
    eval_long_docs: int | None = None  # None: every document long enough
    save_every: int | None = None      # None: at every evaluation
    stop_at_step: int | None = None
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    save_dtype: str = "fp32"
    resume: str | None = None          # "auto": OUTPUT/checkpoint if present; or a state.pt path
    fsdp: bool = False
    init_draft: str | None = None
    max_tokens: int | None = None
    text_field: str = "text"
    progress: bool = True

    def validate(self) -> None:
        checks = [(self.steps >= 1, "--steps must be >= 1"),
                  (self.seq_len >= 2, "--seq-len must be >= 2"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.grad_accum >= 1, "--grad-accum must be >= 1"),
                  (self.lr > 0, "--lr must be > 0"),
                  (self.window is None or self.window >= 1, "--window must be >= 1"),
                  (self.max_lag >= 1, "--max-lag must be >= 1"),
                  (self.loss in ("ce", "distill"), "--loss must be ce or distill"),
                  (self.eval_long_offset >= 0, "--eval-long-offset must be >= 0"),
                  (not self.eval_long_data or self.eval_long_tail >= 1,
                   "--eval-long-tail must be >= 1"),
                  (not self.eval_long_data or (bool(self.eval_long_len) and min(
                      self.eval_long_len) >= self.eval_long_tail),
                   "every --eval-long-len must be >= --eval-long-tail"),
                  (not self.eval_long_data or self.eval_long_docs is None
                   or self.eval_long_docs >= 1, "--eval-long-docs must be >= 1"),
                  (self.dtype in ("auto", "bf16", "fp32"), "--dtype must be auto, bf16 or fp32"),
                  (self.save_dtype in _DTYPES, "--save-dtype must be fp32, bf16 or fp16"),
                  (self.stop_at_step is None or 1 <= self.stop_at_step <= self.steps,
                   "--stop-at-step must be in 1..--steps")]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)


# --------------------------------------------------------------------------- building blocks
def lr_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def make_optimizer(draft: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW(β=(0.9, 0.95)); weight decay on matrices only (not biases, not norm gains)."""
    decay = [p for p in draft.parameters() if p.ndim >= 2]
    no_decay = [p for p in draft.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def build_draft(cfg: TrainConfig, target: FrozenTarget) -> tuple[LongSpecDraftLayer, int]:
    """A fresh draft (seeded, std = the target's initializer_range) or --init-draft's; and the
    self-attention window."""
    if cfg.init_draft:
        ckpt = load_draft_checkpoint(cfg.init_draft)
        check_draft_fits_target(ckpt.arch, target.arch, cfg.init_draft)
        layer = build_draft_layer(ckpt)
        window = cfg.window or ckpt.window or DEFAULT_WINDOW
    else:
        std = float(target.config_dict.get("initializer_range") or 0.02)
        layer = init_draft_weights(LongSpecDraftLayer(target.arch), seed=cfg.seed, std=std)
        window = cfg.window or DEFAULT_WINDOW
    return layer.float().train(), window


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The state file to resume from, or None for a fresh start."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = os.path.join(cfg.output, CHECKPOINT_DIR, STATE_FILE)
        return path if os.path.exists(path) else None
    path = cfg.resume
    if os.path.isdir(path):
        for candidate in (os.path.join(path, STATE_FILE),
                          os.path.join(path, CHECKPOINT_DIR, STATE_FILE)):
            if os.path.exists(candidate):
                return candidate
    if not os.path.isfile(path):
        raise TrainError(f"--resume {cfg.resume!r}: no {STATE_FILE} there")
    return path


def precision(spec: str, device: torch.device) -> tuple[torch.dtype, Callable[[], Any]]:
    """The target dtype for ``--dtype`` (auto: bf16 on GPU, fp32 on CPU) and the draft's
    autocast context factory (bf16 autocast with a bf16 target, else none)."""
    dtype = ((torch.bfloat16 if device.type == "cuda" else torch.float32) if spec == "auto"
             else _DTYPES[spec])
    if dtype == torch.bfloat16:
        return dtype, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return dtype, contextlib.nullcontext


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_state(path: str, draft: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, step: int, extra: dict[str, Any], device: torch.device) -> None:
    """Atomically writes the resume state (tmp file + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"step": step, "draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": _rng_state(device), **extra}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) training; returns the summary (on every rank; rank 0 writes it)."""
    cfg.validate()
    info = setup_distributed(cfg.device)
    try:
        return Trainer(cfg, info).run()
    finally:
        teardown_distributed(info)


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        tqdm.write(message, file=sys.stderr)


def load_eos_id(path: str, target: FrozenTarget) -> tuple[Any, int]:
    """The target's tokenizer and the EOS id that separates documents."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"cannot load the tokenizer of target {path!r}: {e}") from e
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        eos = target.config_dict.get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) else eos
    if eos_id is None:
        raise TrainError(f"target {path!r}: neither the tokenizer nor config.json names an EOS "
                         "token (needed between documents)")
    return tokenizer, int(eos_id)


class Trainer:
    """One run: builds everything in ``__init__``, trains in :meth:`run`."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        device = self.device = info.device
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.dtype, self.autocast = precision(cfg.dtype, device)
        sharded = cfg.fsdp and info.distributed
        if cfg.fsdp and not sharded:
            _log(info, "[longspec-train] --fsdp ignored: a single process")
        self.target = FrozenTarget.load(cfg.target, device="cpu" if sharded else device,
                                        dtype=self.dtype)
        if sharded:
            self.target.shard_fsdp(info)

        tokenizer, eos_id = load_eos_id(cfg.target, self.target)
        self.data = build_data(cfg.data, tokenizer, eos_id=eos_id, seq_len=cfg.seq_len,
                               eval_tokens=cfg.eval_tokens, seed=cfg.seed,
                               max_tokens=cfg.max_tokens, text_field=cfg.text_field)
        _log(info, f"[longspec-train] data: {json.dumps(self.data.stats)}")
        if cfg.eval_long_offset + cfg.seq_len > self.target.max_positions:
            _log(info, f"[longspec-train] warning: --eval-long-offset {cfg.eval_long_offset} + "
                       f"--seq-len exceeds the target's max_position_embeddings "
                       f"{self.target.max_positions}")
        self.long_eval, self.long_eval_stats = self._build_long_eval(tokenizer)
        self.sampler = SequenceSampler(self.data.train.shape[0], cfg.seed)

        self.draft, self.window = build_draft(cfg, self.target)
        self.draft.to(device)
        self.model = wrap_draft_ddp(self.draft, info)
        self.optimizer = make_optimizer(self.draft, cfg)
        warmup = cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.steps, max(warmup, 1), cfg.min_lr_ratio))
        self.state_path = os.path.join(cfg.output, CHECKPOINT_DIR, STATE_FILE)
        self.history: dict[str, list] = {"loss": [], "eval": []}
        self.start_step = self._restore()
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size

    def _build_long_eval(self, tokenizer: Any
                         ) -> tuple[LongPrefixEval | None, dict[str, Any] | None]:
        """The real long-prefix evaluation set (--eval-long-data; runs the target over it)."""
        cfg, info = self.cfg, self.info
        if not cfg.eval_long_data:
            return None, None
        lengths = sorted(set(cfg.eval_long_len))
        windows, stats = load_windows(cfg.eval_long_data, tokenizer, length=lengths[-1],
                                      min_length=lengths[0], max_docs=cfg.eval_long_docs,
                                      text_field=cfg.text_field)
        _log(info, f"[longspec-train] long-prefix eval: {stats['windows']} documents "
                   f"({stats['documents_read']} read, {len(stats['skipped_too_short'])} shorter "
                   f"than {lengths[0]} tokens), lengths {lengths}, last {cfg.eval_long_tail} "
                   "tokens")
        if lengths[-1] > self.target.max_positions:
            _log(info, f"[longspec-train] warning: --eval-long-len {lengths[-1]} exceeds the "
                       f"target's max_position_embeddings {self.target.max_positions}")
        evaluation = LongPrefixEval(self.target, windows, lengths=lengths,
                                    tail=cfg.eval_long_tail, autocast=self.autocast,
                                    progress=cfg.progress and info.is_main)
        return evaluation, stats

    # ------------------------------------------------------------------ state
    def _restore(self) -> int:
        """Loads the resume state if asked and present; returns the step to start from."""
        cfg, info = self.cfg, self.info
        path = resolve_resume(cfg)
        if not path:
            return 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.draft.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        step = int(state["step"])
        self.history = state.get("history", self.history)
        saved = state.get("config", {})
        changed = [k for k in ("seq_len", "batch_size", "grad_accum", "seed", "loss", "max_lag")
                   if k in saved and saved[k] != getattr(cfg, k)]
        if saved.get("world_size", info.world_size) != info.world_size:
            changed.append("world_size")
        if changed:
            _log(info, f"[longspec-train] warning: resuming with changed {changed}: the run will "
                       "not repeat the interrupted one exactly")
        if step > cfg.steps:
            raise TrainError(f"the checkpoint {path!r} is at step {step}, past --steps "
                             f"{cfg.steps}")
        _log(info, f"[longspec-train] resumed from {path} at step {step}")
        return step

    def checkpoint(self, step: int) -> None:
        if self.info.is_main:
            extra = {"history": self.history, "window": self.window,
                     "config": {**asdict(self.cfg), "world_size": self.info.world_size}}
            save_state(self.state_path, self.draft, self.optimizer, self.scheduler, step, extra,
                       self.device)
        barrier(self.info)

    # ------------------------------------------------------------------ steps
    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Held-out metrics (every rank computes them all; see metrics.py and long_eval.py):
        ``{"step", "short", "long", "long_doc"}``, the last with --eval-long-data only."""
        if self.data.eval.shape[0] == 0 and self.long_eval is None:
            return None
        record: dict[str, Any] = {"step": step}
        if self.data.eval.shape[0]:
            metrics = evaluate_short_long(self.draft, self.target, self.data.eval,
                                          window=self.window, batch_size=self.cfg.batch_size,
                                          long_offset=self.cfg.eval_long_offset,
                                          autocast=self.autocast)
            record.update(metrics)
            _log(self.info, "[longspec-train] eval step %d: %s" % (step, "  ".join(
                f"{name}: accept {m['accept']:.4f} top1 {m['top1']:.4f} ce {m['ce']:.4f}"
                for name, m in metrics.items())))
        if self.long_eval is not None:
            record["long_doc"] = self.long_eval.evaluate(self.draft, window=self.window)
            for line in format_long_eval(record["long_doc"]):
                _log(self.info, f"[longspec-train] eval step {step} long-prefix {line}")
        self.history["eval"].append(record)
        return record

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids [B, S], positions [B, S], lag) of one micro-batch: a function of
        (seed, step, rank, micro) only."""
        cfg, info = self.cfg, self.info
        rng = random.Random(f"{cfg.seed}/{step}/{info.rank}/{micro}")
        lag = rng.randint(1, cfg.max_lag)
        first = ((step * cfg.grad_accum + micro) * info.world_size + info.rank) * cfg.batch_size
        ids = self.data.train[self.sampler.rows(first, cfg.batch_size)].to(self.device)
        positions = anchor_offset_positions(
            cfg.batch_size, cfg.seq_len, max_len=self.target.max_positions, rng=rng,
            enabled=cfg.anchor_offset, threshold=cfg.anchor_threshold, device=self.device)
        return ids, positions, lag

    def train_step(self, step: int) -> float:
        """One optimizer step (all micro-batches); returns this rank's mean loss."""
        cfg = self.cfg
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            ids, positions, lag = self.micro_batch(step, micro)
            last = micro == cfg.grad_accum - 1
            sync = (contextlib.nullcontext() if last or not self.info.distributed
                    else self.model.no_sync())
            with sync:
                with self.autocast():
                    out = draft_forward(self.model, self.target, ids, positions,
                                        window=self.window, lag=lag)
                    if cfg.loss == "ce":
                        total, count = lm_loss(out.hidden, self.target.lm_head, "ce",
                                               labels=next_token_labels(ids).reshape(-1))
                    else:
                        total, count = lm_loss(
                            out.hidden, self.target.lm_head, "distill",
                            target_hidden=out.target.hidden.reshape(out.hidden.shape[0], -1))
                    loss = total / max(count, 1) / cfg.grad_accum
                loss.backward()
            step_loss += loss.item()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        end_step = cfg.stop_at_step or cfg.steps
        save_every = cfg.save_every if cfg.save_every is not None else cfg.eval_every
        initial_eval = self.evaluate(0) if self.start_step == 0 else None

        bar = tqdm(total=end_step, initial=self.start_step, desc="longspec-train",
                   disable=not (info.is_main and cfg.progress), dynamic_ncols=True,
                   file=sys.stderr)
        self.model.train()
        train_time, trained_steps = 0.0, 0
        pending: list[float] = []
        last_loss = float("nan")
        for step in range(self.start_step, end_step):
            t0 = time.perf_counter()
            local_loss = self.train_step(step)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_time += time.perf_counter() - t0
            trained_steps += 1
            done = step + 1
            last_loss = mean_across_ranks(local_loss, info)
            pending.append(last_loss)
            if done % max(cfg.log_every, 1) == 0 or done == end_step:
                self.history["loss"].append([done, sum(pending) / len(pending)])
                pending = []
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}",
                            tok_s=f"{trained_steps * self.tokens_per_step / train_time:.0f}",
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done < cfg.steps:
                self.evaluate(done)
            if save_every and save_every > 0 and done % save_every == 0 and done < end_step:
                self.checkpoint(done)
        bar.close()

        completed = end_step == cfg.steps
        final_eval = None
        if completed:
            evals = self.history["eval"]
            final_eval = (evals[-1] if evals and evals[-1]["step"] == cfg.steps
                          else self.evaluate(cfg.steps))
        if end_step > self.start_step or not os.path.exists(self.state_path):
            self.checkpoint(end_step)

        digests = gather_objects(weights_digest(self.draft), info)
        evals = self.history["eval"]
        summary: dict[str, Any] = {
            "completed": completed,
            "steps": end_step,
            "total_steps": cfg.steps,
            "start_step": self.start_step,
            "steps_this_run": trained_steps,
            "world_size": info.world_size,
            "device": str(self.device),
            "target_dtype": str(self.dtype).replace("torch.", ""),
            "window": self.window,
            "tokens_per_step": self.tokens_per_step,
            "train_tokens_this_run": trained_steps * self.tokens_per_step,
            "tokens_per_s": (trained_steps * self.tokens_per_step / train_time
                             if train_time else 0.0),
            "train_time_s": train_time,
            "final_loss": last_loss if trained_steps else None,
            "loss_history": self.history["loss"],
            "eval_initial": initial_eval or (evals[0] if evals and evals[0]["step"] == 0
                                             else None),
            "eval": final_eval,
            "eval_history": evals,
            "data": self.data.stats,
            "long_eval_data": self.long_eval_stats,
            "rank_weight_digests": digests,
            "weights_in_sync": len(set(digests)) == 1,
            "output": os.path.abspath(cfg.output),
            "draft": None,
            "config": asdict(cfg),
        }
        if info.is_main:
            if completed:
                self.save_draft()
                summary["draft"] = os.path.abspath(cfg.output)
            os.makedirs(cfg.output, exist_ok=True)
            with open(os.path.join(cfg.output, SUMMARY_FILE), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, default=str)
        barrier(info)
        return summary

    def save_draft(self) -> None:
        """The final draft in the published layout (what vLLM loads)."""
        cfg = self.cfg
        extra = {"trained_by": "vllm-longspec train", "steps": cfg.steps, "max_lag": cfg.max_lag,
                 "loss": cfg.loss, "anchor_offset": cfg.anchor_offset, "seq_len": cfg.seq_len}
        save_draft_checkpoint(self.draft, cfg.output, window=self.window,
                              target_config=self.target.config_dict,
                              dtype=_DTYPES[cfg.save_dtype], extra=extra)
        # For drafting over the most frequent tokens only (draft_vocab_size, `draft.vocab`).
        save_token_counts(cfg.output, count_tokens(self.data.train, self.draft.arch.vocab_size))
