"""Training data: files -> documents -> token stream -> packed sequences, with a held-out split.

Inputs (``--data``, any number): files, folders (read recursively, binary files skipped) or glob
patterns (``**`` allowed; quote them). ``*.jsonl`` files hold one JSON object per line with the
text in a field (default ``"text"``); every other file is one plain-text document (code, prose).

Documents are shuffled (seeded), tokenized with the target's tokenizer (no special tokens) and
concatenated with the EOS token after each one; the stream is cut into sequences of
``--seq-len`` tokens (packing; the remainder is dropped). The held-out set is whole documents
taken from the front of the shuffled order, so no document is in both splits; when that is not
possible (a single document, or too little data) the last tokens of the stream are held out.

Which sequences a step reads is a pure function of (seed, step, rank): a resumed run reads
exactly what the interrupted one would have.
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import TrainError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_GLOB_CHARS = set("*?[")
_TOKENIZE_BATCH = 64


class DataError(TrainError):
    """The training data is missing, empty or too small."""


@dataclass
class TokenizedData:
    """train: [n_train, seq_len] int64 token ids; eval: [n_eval, eval_len] (may be empty)."""

    train: torch.Tensor
    eval: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def expand_data_paths(specs: Sequence[str]) -> list[str]:
    """Files named by `specs` (files, folders, globs), each once, sorted within a spec."""
    paths: list[str] = []
    for spec in specs:
        if _GLOB_CHARS & set(spec):
            found = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True)
                           if os.path.isfile(p))
            if not found:
                raise DataError(f"--data pattern {spec!r} matches no file")
        elif os.path.isdir(spec):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                           for name in names)
            found = [p for p in found if os.path.isfile(p)]
            if not found:
                raise DataError(f"--data folder {spec!r} holds no file")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise DataError(f"--data file {spec!r} does not exist")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def _is_binary(raw: bytes) -> bool:
    return b"\x00" in raw[:8192]


def read_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yields the non-empty documents of `paths` (binary files are skipped)."""
    for path in paths:
        if path.endswith(JSONL_SUFFIXES):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({e})")
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{line_no}: no string field {text_field!r}")
                    if text:
                        yield text
            continue
        with open(path, "rb") as f:
            raw = f.read()
        if _is_binary(raw):
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            yield text


def _tokenize(docs: Sequence[str], tokenizer: Any, max_tokens: int | None) -> list[list[int]]:
    out: list[list[int]] = []
    total = 0
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        batch = docs[start:start + _TOKENIZE_BATCH]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                out.append(list(ids))
                total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def _stream(docs: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    if not docs:
        return torch.zeros(0, dtype=torch.int64)
    eos = torch.tensor([eos_id], dtype=torch.int64)
    return torch.cat([t for ids in docs for t in (torch.tensor(ids, dtype=torch.int64), eos)])


def _pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def build_data(specs: Sequence[str], tokenizer: Any, *, eos_id: int, seq_len: int,
               eval_tokens: int, seed: int = 0, max_tokens: int | None = None,
               text_field: str = "text") -> TokenizedData:
    """Reads, tokenizes, packs and splits the data (see the module docstring).

    Args:
        eval_tokens: held-out tokens wanted (at most half of the data is held out; 0 for none).
        max_tokens: stop tokenizing once this many tokens are read (None: all).
    """
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    paths = expand_data_paths(specs)
    docs = list(read_documents(paths, text_field))
    if not docs:
        raise DataError(f"no text in the {len(paths)} --data file(s)")
    random.Random(seed).shuffle(docs)
    if hasattr(tokenizer, "model_max_length"):  # silences "sequence longer than ..." warnings
        tokenizer.model_max_length = 1 << 62
    token_docs = _tokenize(docs, tokenizer, max_tokens)
    if not token_docs:
        raise DataError("the --data documents tokenize to nothing")
    total = sum(len(d) + 1 for d in token_docs)
    want_eval = min(max(eval_tokens, 0), total // 2)

    split = "documents"
    taken, eval_count = 0, 0
    while want_eval and taken < len(token_docs) and eval_count < want_eval:
        eval_count += len(token_docs[taken]) + 1
        taken += 1
    if want_eval and (taken == len(token_docs) or total - eval_count < seq_len):
        split = "tokens"
        stream = _stream(token_docs, eos_id)
        eval_stream, train_stream = stream[stream.numel() - want_eval:], stream[:-want_eval]
    else:
        eval_stream = _stream(token_docs[:taken], eos_id)[:want_eval]
        train_stream = _stream(token_docs[taken:], eos_id)
    if train_stream.numel() < seq_len:
        raise DataError(f"only {train_stream.numel()} training tokens: fewer than one "
                        f"--seq-len {seq_len} sequence (add data or lower --seq-len)")
    train = _pack(train_stream, seq_len)
    eval_len = min(seq_len, eval_stream.numel())
    evals = _pack(eval_stream, eval_len) if eval_len >= 2 else torch.zeros(0, 2, dtype=torch.int64)
    stats = {"files": len(paths), "documents": len(token_docs), "tokens": total,
             "train_sequences": train.shape[0], "train_tokens": train.numel(),
             "eval_sequences": evals.shape[0], "eval_tokens": evals.numel(), "split": split}
    return TokenizedData(train=train, eval=evals, stats=stats)


class SequenceSampler:
    """Global sample k -> a training row: epoch ``k // n`` is a seeded permutation of the rows."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_rows, generator=gen)
        return self._perms[epoch]

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Rows of global samples ``first .. first + count - 1``."""
        n = self.num_rows
        return torch.stack([self._perm(k // n)[k % n] for k in range(first, first + count)])
