"""Held-out acceptance over REAL long prefixes.

    python -m vllm_longspec.train.long_eval --target T --draft D [D ...] --data FILE... \
        --len 16384 32768 --tail 1024 [--docs N] [--out results.json]
    vllm-longspec train ... --eval-long-data FILE... --eval-long-len 16384 32768

metrics.py's "long" evaluation only shifts the positions of short sequences, so the draft's
cross-attention never covers more than a short prefix. Here every evaluation window is the
first ``W = max(lengths)`` tokens of a real long document (fewer if the document is shorter): the
frozen target reads the whole window once through :class:`FrozenTarget` (the training code path;
its last-layer K/V, post-RoPE, are kept), then the draft runs over the window exactly as in
training (:func:`run_draft`: self-attention over its own last ``window`` tokens, cross-attention
over ALL the target's K/V up to index ``i - lag``, real positions ``0..W-1``), and metrics.py's
per-token metrics (E[accept] = Σ min(p_target, p_draft), greedy top-1 agreement, CE) are taken
on blocks of ``M = tail`` tokens:

  * ``head``: tokens ``0..M-1`` of the same documents (short positions, short prefix);
  * ``tail`` at each length L: tokens ``L-M..L-1`` (positions >= L-M, with the real L-M-token
    prefix): the serving situation after a long prompt;
  * ``no_prefix`` at each L: the same tail tokens as a sequence of their own at positions
    ``0..M-1`` (neither target nor draft sees a prefix): what the prefix changes for the very
    same tokens.

By causality one pass per window serves every L (tokens < L never see tokens >= L), and only the
evaluated blocks get logits (a 32k-token window's full logits would be ~20 GB in fp32). The
target's passes are done once, when the evaluation set is built (CPU copies of the K/V, W x Hk x
D x 2 values per window, and of the blocks' final hidden states), and reused for every draft and
every evaluation step; the draft's pass over a window is O(W) (windowed self-attention, one
causal cross-attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .data import DataError, expand_data_paths, read_documents
from .errors import TrainError
from .forward import run_draft
from .loss import IGNORE_INDEX
from .metrics import ROOT_LAG, TokenMetrics, summarize, token_metrics
from .positions import plain_positions
from .target_kv import FrozenTarget, TargetBatch

DEFAULT_TAIL = 1024
DEFAULT_LENGTHS = (16384,)
# A document is first tokenized from its first `_CHARS_PER_TOKEN * W` characters (BPE vocabularies
# average 3-5 characters per token), the whole document only if that gives too few tokens.
_CHARS_PER_TOKEN = 8
_CUT_MARGIN = 64  # tokens at the end of a cut text that may tokenize differently uncut

# A block of a window: ("head", None), ("tail", L) or ("no_prefix", L).
BlockKey = tuple[str, "int | None"]


@dataclass
class LongWindow:
    """One evaluation window: the first W tokens of a document.

    ids: [W] int64 token ids; labels: [W] the next token of each (the document's token W for the
    last one, IGNORE_INDEX at the document's end)."""

    name: str
    ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class _PreparedWindow:
    """A window after the target's passes. k, v: [1, W, Hk, D] (CPU); hidden[block]: [M, hidden]
    the target's final hidden states on the block's tokens; alone[L]: (k, v, hidden) of the
    target's pass over the L tail's tokens alone."""

    window: LongWindow
    k: torch.Tensor
    v: torch.Tensor
    hidden: dict[BlockKey, torch.Tensor]
    alone: dict[int, tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- documents
def _named_documents(specs: Sequence[str], text_field: str) -> Iterator[tuple[str, str]]:
    """(name, text) of every document; names are paths relative to the files' common folder
    (``file.jsonl:N`` for the N-th record of a JSONL file)."""
    paths = expand_data_paths(specs)
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    for path in paths:
        name = os.path.relpath(os.path.abspath(path), base)
        docs = list(read_documents([path], text_field))
        for i, text in enumerate(docs):
            yield (f"{name}:{i}" if len(docs) > 1 else name), text


def _tokenize_prefix(text: str, tokenizer: Any, tokens: int) -> list[int]:
    """At least the first `tokens` token ids of `text` (all of them if it has fewer)."""
    budget = _CHARS_PER_TOKEN * tokens
    if len(text) > budget:
        ids = tokenizer(text[:budget], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens + _CUT_MARGIN:
            return list(ids[:tokens])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])


def load_windows(specs: Sequence[str], tokenizer: Any, *, length: int, min_length: int,
                 max_docs: int | None = None, text_field: str = "text"
                 ) -> tuple[list[LongWindow], dict[str, Any]]:
    """One window per document (files in path order, at most `max_docs`): its first `length`
    tokens, tokenized with the target's tokenizer (no special tokens, as the training data).
    Documents shorter than `min_length` tokens are skipped.

    Returns:
        (windows, stats): stats lists the windows, their sizes and the skipped documents.
    """
    if hasattr(tokenizer, "model_max_length"):  # silences "sequence longer than ..." warnings
        tokenizer.model_max_length = 1 << 62
    windows: list[LongWindow] = []
    skipped: dict[str, int] = {}
    documents = 0
    for name, text in _named_documents(specs, text_field):
        documents += 1
        ids = _tokenize_prefix(text, tokenizer, length + 1)
        if len(ids) < min_length:
            skipped[name] = len(ids)
            continue
        ids_t = torch.tensor(ids[:length], dtype=torch.int64)
        labels = torch.full_like(ids_t, IGNORE_INDEX)
        labels[:-1] = ids_t[1:]
        if len(ids) > length:
            labels[-1] = ids[length]
        windows.append(LongWindow(name=name, ids=ids_t, labels=labels))
        if max_docs is not None and len(windows) >= max_docs:
            break
    if not windows:
        raise DataError(f"no long-evaluation document has >= {min_length} tokens "
                        f"({documents} read; shortest-first: {sorted(skipped.values())[:5]})")
    stats = {"documents_read": documents, "windows": len(windows),
             "window_tokens": {w.name: int(w.ids.numel()) for w in windows},
             "skipped_too_short": skipped}
    return windows, stats


# --------------------------------------------------------------------------- the evaluation
class LongPrefixEval:
    """The long-prefix evaluation set of one target: build once (runs the target), then
    :meth:`evaluate` any number of drafts.

    Args:
        target: the frozen target (on its device).
        windows: from :func:`load_windows`; each needs >= min(lengths) tokens.
        lengths: prefix lengths L whose tail blocks ``L-M..L-1`` are evaluated.
        tail: M, tokens per block (``head`` is ``0..M-1``).
        lag: the draft's cross-attention lag (1 = the tree root, as metrics.py).
        autocast: the training's autocast context factory (bf16 runs), used for target and draft.
        progress: tqdm bars over the windows.
    """

    def __init__(self, target: FrozenTarget, windows: Sequence[LongWindow], *,
                 lengths: Sequence[int] = DEFAULT_LENGTHS, tail: int = DEFAULT_TAIL,
                 lag: int = ROOT_LAG, autocast: Callable[[], Any] | None = None,
                 progress: bool = False):
        lengths = sorted(set(int(n) for n in lengths))
        if tail < 1 or not lengths or lengths[0] < tail:
            raise TrainError(f"long evaluation: every length must be >= the tail ({tail} tokens)"
                             f", got {lengths}")
        if lag < 1:
            raise TrainError(f"long evaluation: lag must be >= 1, got {lag}")
        short = [w.name for w in windows if w.ids.numel() < lengths[0]]
        if short:
            raise TrainError(f"long evaluation: windows shorter than {lengths[0]} tokens: {short}")
        self.target, self.lengths, self.tail, self.lag = target, lengths, tail, lag
        self.autocast = autocast or contextlib.nullcontext
        self.progress = progress
        self.device = target.lm_head.weight.device
        bar = tqdm(windows, desc="long-eval target", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        self.prepared = [self._prepare(w) for w in bar]

    def blocks(self, window_tokens: int) -> dict[BlockKey, tuple[int, int]]:
        """The evaluated blocks of a window of `window_tokens` tokens: key -> (start, end)."""
        m = self.tail
        out: dict[BlockKey, tuple[int, int]] = {("head", None): (0, m)}
        for n in self.lengths:
            if n <= window_tokens:
                out[("tail", n)] = (n - m, n)
                out[("no_prefix", n)] = (n - m, n)
        return out

    @torch.no_grad()
    def _target_pass(self, ids: torch.Tensor) -> TargetBatch:
        """The target over ids [1, S] at positions 0..S-1 (as in training: FrozenTarget)."""
        positions = plain_positions(1, ids.shape[1], device=self.device)
        with self.autocast():
            return self.target(ids, positions)

    def _prepare(self, window: LongWindow) -> _PreparedWindow:
        ids = window.ids.to(self.device)[None]
        out = self._target_pass(ids)
        hidden: dict[BlockKey, torch.Tensor] = {}
        alone: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, (start, end) in self.blocks(ids.shape[1]).items():
            if key[0] == "no_prefix":
                tail_out = self._target_pass(ids[:, start:end])
                alone[key[1]] = (tail_out.k.cpu(), tail_out.v.cpu())
                hidden[key] = tail_out.hidden[0].cpu()
            else:
                hidden[key] = out.hidden[0, start:end].cpu()
        return _PreparedWindow(window=window, k=out.k.cpu(), v=out.v.cpu(), hidden=hidden,
                               alone=alone)

    def _draft_hidden(self, draft: nn.Module, ids: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, window: int) -> torch.Tensor:
        """The draft over ids [1, S] at positions 0..S-1 with the target's K/V [1, S, Hk, D];
        returns [S, hidden]."""
        positions = plain_positions(1, ids.shape[1], device=self.device)
        embeds = self.target.embed(ids)
        return run_draft(draft, self.target, embeds, positions, k.to(self.device),
                         v.to(self.device), window=window, lag=self.lag)

    @torch.no_grad()
    def token_metrics(self, draft: nn.Module, *, window: int
                      ) -> list[dict[BlockKey, TokenMetrics]]:
        """Per window, per block: the per-token metrics (:class:`TokenMetrics`, M tokens)."""
        was_training = draft.training
        draft.eval()
        results = []
        try:
            bar = tqdm(self.prepared, desc="long-eval draft", disable=not self.progress,
                       file=sys.stderr, dynamic_ncols=True)
            for prep in bar:
                w = prep.window
                ids = w.ids.to(self.device)[None]
                labels = w.labels.to(self.device)
                per_block: dict[BlockKey, TokenMetrics] = {}
                with self.autocast():
                    full = self._draft_hidden(draft, ids, prep.k, prep.v, window)
                    for key, (start, end) in self.blocks(ids.shape[1]).items():
                        if key[0] == "no_prefix":
                            k, v = prep.alone[key[1]]
                            hidden = self._draft_hidden(draft, ids[:, start:end], k, v, window)
                        else:
                            hidden = full[start:end]
                        per_block[key] = token_metrics(hidden, prep.hidden[key].to(self.device),
                                                       labels[start:end], self.target.lm_head)
                results.append(per_block)
        finally:
            draft.train(was_training)
        return results

    def evaluate(self, draft: nn.Module, *, window: int) -> dict[str, Any]:
        """Summary of :meth:`token_metrics`:

        ``{"tail": M, "lag", "windows", "lengths": {"L": {"windows", "head", "tail",
        "no_prefix"}}, "per_window": [{"name", "tokens", "head", "tail": {"L": m},
        "no_prefix": {"L": m}}]}``, each metric set as metrics.py's ``{"accept", "top1", "ce",
        "tokens"}``. ``lengths[L]`` averages over the windows of >= L tokens, its ``head`` over
        the same windows."""
        per_window = self.token_metrics(draft, window=window)
        lengths: dict[str, Any] = {}
        for n in self.lengths:
            rows = [m for m in per_window if ("tail", n) in m]
            lengths[str(n)] = {"windows": len(rows),
                               **{kind: summarize([m[(kind, None if kind == "head" else n)]
                                                   for m in rows])
                                  for kind in ("head", "tail", "no_prefix")}}
        windows = []
        for prep, metrics in zip(self.prepared, per_window):
            entry: dict[str, Any] = {"name": prep.window.name,
                                     "tokens": int(prep.window.ids.numel()),
                                     "head": summarize([metrics[("head", None)]]),
                                     "tail": {}, "no_prefix": {}}
            for (kind, n), m in metrics.items():
                if kind != "head":
                    entry[kind][str(n)] = summarize([m])
            windows.append(entry)
        return {"tail": self.tail, "lag": self.lag, "windows": len(self.prepared),
                "lengths": lengths, "per_window": windows}


def format_long_eval(result: dict[str, Any]) -> list[str]:
    """One line per length: head / tail / no-prefix E[accept] and top-1."""
    lines = []
    for n, r in result["lengths"].items():
        parts = "  ".join(f"{kind} accept {r[kind]['accept']:.4f} top1 {r[kind]['top1']:.4f}"
                          for kind in ("head", "tail", "no_prefix"))
        lines.append(f"L={n} ({r['windows']} docs, last {result['tail']}): {parts}")
    return lines


# --------------------------------------------------------------------------- standalone command
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_longspec.train.long_eval",
        description="Acceptance of trained LongSpec drafts over real long prefixes "
                    "(first tokens vs the last tokens of L-token document windows).")
    p.add_argument("--target", required=True, help="local Hugging Face folder of the target")
    p.add_argument("--draft", required=True, nargs="+", metavar="DRAFT",
                   help="draft folders (or weights files); all share one target pass")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="long documents: files, folders, quoted globs, *.jsonl")
    p.add_argument("--text-field", default="text", help="JSONL field with the text (%(default)s)")
    p.add_argument("--len", dest="lengths", type=_positive_int, nargs="+",
                   default=list(DEFAULT_LENGTHS), metavar="L",
                   help="prefix lengths: each evaluates tokens L-tail..L-1 (%(default)s)")
    p.add_argument("--tail", type=_positive_int, default=DEFAULT_TAIL,
                   help="tokens per evaluated block (%(default)s)")
    p.add_argument("--docs", type=_positive_int, default=None,
                   help="at most this many documents (default: all long enough)")
    p.add_argument("--window", type=_positive_int, default=None,
                   help="draft self-attention window (default: each draft's own)")
    p.add_argument("--lag", type=_positive_int, default=ROOT_LAG,
                   help="cross-attention lag (%(default)s: the tree root)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (%(default)s)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="target dtype; bf16 also autocasts the draft (auto: bf16 on GPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluates every --draft; returns {"config", "data", "drafts": {path: result}}."""
    from ..draft.checkpoint import build_draft_layer, check_draft_fits_target, load_draft_checkpoint
    from .dist import resolve_device
    from .loop import DEFAULT_WINDOW, load_eos_id, precision

    device = resolve_device(args.device, 0)
    dtype, autocast = precision(args.dtype, device)
    target = FrozenTarget.load(args.target, device=device, dtype=dtype)
    tokenizer, _ = load_eos_id(args.target, target)
    lengths = sorted(set(args.lengths))
    windows, stats = load_windows(args.data, tokenizer, length=lengths[-1],
                                  min_length=lengths[0], max_docs=args.docs,
                                  text_field=args.text_field)
    if lengths[-1] > target.max_positions:
        print(f"[long-eval] warning: --len {lengths[-1]} exceeds the target's "
              f"max_position_embeddings {target.max_positions}", file=sys.stderr)
    evaluation = LongPrefixEval(target, windows, lengths=lengths, tail=args.tail, lag=args.lag,
                                autocast=autocast, progress=not args.no_progress)
    drafts = {}
    for path in args.draft:
        ckpt = load_draft_checkpoint(path)
        check_draft_fits_target(ckpt.arch, target.arch, path)
        # fp32 weights under the training's autocast: the numbers of the in-training evaluation.
        layer = build_draft_layer(ckpt, dtype=torch.float32, device=device)
        window = args.window or ckpt.window or DEFAULT_WINDOW
        result = evaluation.evaluate(layer, window=window)
        meta = ckpt.config.get("longspec", {}) if isinstance(ckpt.config, dict) else {}
        drafts[path] = {"window": window, "anchor_offset": meta.get("anchor_offset"),
                        "steps": meta.get("steps"), **result}
        print(f"[long-eval] {path} (window {window}):", file=sys.stderr)
        for line in format_long_eval(result):
            print(f"  {line}", file=sys.stderr)
    return {"config": dict(vars(args)), "target_dtype": str(dtype).replace("torch.", ""),
            "data": stats, "drafts": drafts}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from ..draft.checkpoint import DraftCheckpointError

    try:
        results = run(args)
    except (TrainError, DraftCheckpointError) as e:
        print(f"long_eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
