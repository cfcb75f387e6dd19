"""Prompts for the end-to-end benchmark, as token ids identical for every method.

Two prompt families, cut into fixed-length token windows:

* documents: the files of ``longtexts.tar.xz`` (unpacked to a temporary folder), ordered so that
  the first windows come from text a model is unlikely to know by heart (the Debian reference,
  then the less famous novels; *Emma* and *Pride and Prejudice* last);
* code: "repositories" = Python standard-library packages (``asyncio/``, ``email/``, ...), each
  one's files concatenated with a path header.

Windows are taken round-robin over the sources (chunk 0 of every source, then chunk 1, ...), so
a batch mixes documents. Which windows a point uses depends only on its batch size and whether
it samples (``window_indices``), never on the other points of the run: separate invocations
(``--methods`` subsets) build the same prompts for the same point. A task wraps each window
(``TASKS``) into a prompt of exactly the requested number of tokens.

Without a tokenizer (or without the texts) prompts come from ``synthetic_stream``: phrases of a
fixed random lexicon, so that prompt-lookup methods still find repeats.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any

# task -> (family, wrapping, instruction appended after the window)
TASKS: dict[str, tuple[str, str, str]] = {
    "continue": ("docs", "raw", "\n\nContinue:\n"),
    "summary": ("docs", "chat", "\n\nSummarize the text above."),
    "code": ("code", "raw", "\n\n# Next function:\n"),
}
# Less memorised text first: window 0 (batch 1, greedy) is the Debian reference.
DOC_ORDER = ["debian-reference.en", "persuasion", "northangerabbey", "mansfieldpark",
             "sensesensibility", "tinyshakespeare", "prideprejudice", "emma"]
# A fixed list (never "whatever is installed"), so that the windows do not depend on the
# machine beyond the Python version; the top-level modules form one more repository.
CODE_PACKAGES = ["asyncio", "email", "multiprocessing", "logging", "http", "importlib",
                 "unittest", "xml", "concurrent", "urllib", "json", "sqlite3", "tomllib",
                 "zoneinfo", "wsgiref", "ctypes", "tkinter", "idlelib", "lib2to3", "dbm",
                 "curses", "venv", "html", "collections", "re"]
TOP_LEVEL_REPO = "stdlib-modules"
CODE_HEADER = "# ---- file: {path}\n"
# Windows of the sampled points are shifted past the greedy ones (batch sizes up to 16 keep
# the two sets apart): suffix decoding's global tree must not have seen the greedy output.
# 32 = a multiple of the 8 documents, so batch 1 samples from the Debian reference too.
SAMPLED_WINDOW_SHIFT = 32


def parse_context(text: str) -> int:
    """``"4k"`` -> 4096, ``"32K"`` -> 32768, ``"256"`` -> 256."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def window_indices(batch: int, temperature: float) -> list[int]:
    """Window ids of a point: batch b takes windows b-1 .. 2b-2, disjoint for powers of two;
    sampled points take the same shifted by ``SAMPLED_WINDOW_SHIFT``."""
    start = batch - 1 + (SAMPLED_WINDOW_SHIFT if temperature > 0 else 0)
    return list(range(start, start + batch))


@dataclass
class Source:
    name: str
    ids: list[int]


@dataclass
class PromptSet:
    """The prompts of one point, and where their windows came from."""

    task: str
    context: int            # prompt tokens, exactly
    prompts: list[list[int]]
    sources: list[str]      # "name#chunk" per prompt
    reused: bool = False    # some window had to be taken twice (sources too short)

    def digests(self) -> list[str]:
        return [prompt_digest(p) for p in self.prompts]


def prompt_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def default_code_dir() -> str:
    """The GPU image's ``/usr/lib/python3.12`` when present, else this interpreter's stdlib."""
    return "/usr/lib/python3.12" if os.path.isdir("/usr/lib/python3.12/asyncio") \
        else sysconfig.get_paths()["stdlib"]


def default_longtexts() -> str | None:
    """``$LONGSPEC_LONGTEXTS``, else ``shared/data`` or ``../shared/data`` from the working
    directory or from this file's checkout."""
    env = os.environ.get("LONGSPEC_LONGTEXTS")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.dirname(here)):
        for rel in ("shared/data", "../shared/data", ".stage/data"):
            path = os.path.join(root, rel, "longtexts.tar.xz")
            if os.path.exists(path):
                return os.path.abspath(path)
    return None


def read_documents(archive: str, order: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, text) of every ``.txt`` in the archive, in ``order`` (by file stem) first."""
    order = order or DOC_ORDER
    docs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                if name.endswith(".txt"):
                    with open(os.path.join(dirpath, name), encoding="utf-8",
                              errors="replace") as f:
                        docs[name[:-4]] = f.read()
    ranked = [n for n in order if n in docs] + sorted(n for n in docs if n not in order)
    return [(n, docs[n]) for n in ranked]


def _read_sources(paths: list[str], root: str) -> str:
    parts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(CODE_HEADER.format(path=os.path.relpath(path, root)) + text)
    return "\n".join(parts)


def read_code_repos(code_dir: str) -> list[tuple[str, str]]:
    """(repository, concatenated sources): the ``CODE_PACKAGES`` present in `code_dir` (tests
    left out), then all top-level modules as ``TOP_LEVEL_REPO``."""
    repos = []
    for name in CODE_PACKAGES:
        top = os.path.join(code_dir, name)
        if not os.path.isfile(os.path.join(top, "__init__.py")):
            continue
        paths = []
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in ("__pycache__", "test", "tests", "idle_test"))
            paths += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py")]
        text = _read_sources(paths, code_dir)
        if text:
            repos.append((name, text))
    modules = sorted(os.path.join(code_dir, f) for f in os.listdir(code_dir)
                     if f.endswith(".py") and not f.startswith("_"))
    text = _read_sources(modules, code_dir)
    if text:
        repos.append((TOP_LEVEL_REPO, text))
    return repos


def synthetic_stream(name: str, num_tokens: int, vocab_size: int, seed: int) -> list[int]:
    """Phrases (2-6 tokens) drawn from a 300-phrase lexicon: repetitive like real text."""
    rng = random.Random(f"{name}-{seed}")
    low, high = 5, max(6, min(vocab_size - 5, 1000))
    lexicon = [[rng.randrange(low, high) for _ in range(rng.randint(2, 6))] for _ in range(300)]
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += rng.choice(lexicon)
    return ids[:num_tokens]


@dataclass
class PromptBuilder:
    """Cuts the sources of both families into windows and wraps them into task prompts.

    ``tokenizer=None`` (or missing texts) gives synthetic sources; ``source_kind`` records
    which one each family used."""

    tokenizer: Any
    vocab_size: int
    longtexts: str | None = None
    code_dir: str | None = None
    doc_order: list[str] | None = None
    max_windows: int = 1
    max_context: int = 4096
    cache_dir: str | None = None   # token ids of the texts, keyed by texts and tokenizer
    sources: dict[str, list[Source]] = field(default_factory=dict)
    source_kind: dict[str, str] = field(default_factory=dict)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _load(self, family: str) -> list[Source]:
        if family in self.sources:
            return self.sources[family]
        needed = self.max_windows * self.max_context
        texts: list[tuple[str, str]] = []
        if self.tokenizer is not None:
            if family == "docs" and self.longtexts and os.path.exists(self.longtexts):
                texts = read_documents(self.longtexts, self.doc_order)
            elif family == "code":
                texts = read_code_repos(self.code_dir or default_code_dir())
        if texts:
            sources = [Source(n, ids) for (n, _), ids in zip(texts, self._encode_all(texts))]
            self.source_kind[family] = "text"
        else:
            sources = [Source(f"synthetic-{family}-{i}",
                              synthetic_stream(family, max(needed // 4, self.max_context) + 64,
                                               self.vocab_size, i)) for i in range(4)]
            self.source_kind[family] = "synthetic"
        self.sources[family] = sources
        return sources

    def _encode_all(self, texts: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids of every text, through a cache file: tokenizing ~13 MB of text costs
        10-20 s, which every device call would otherwise pay again."""
        key = hashlib.sha256(tokenizer_fingerprint(self.tokenizer).encode())
        for name, text in texts:
            key.update(name.encode() + b"\0" + text.encode("utf-8", "replace"))
        path = (os.path.join(self.cache_dir, f"tokens-{key.hexdigest()[:24]}.json")
                if self.cache_dir else None)
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        encoded = [list(ids) for ids in
                   self.tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]]
        if path:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(encoded, f)
            os.replace(path + ".tmp", path)
        return encoded

    def _wrap(self, task: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the window for `task`."""
        _, wrapping, instruction = TASKS[task]
        if self.tokenizer is None:
            return [], [1, 2, 3]  # a fixed cue in place of the instruction
        if wrapping == "chat" and getattr(self.tokenizer, "chat_template", None):
            marker = "\x00WINDOW\x00"
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": marker + instruction}], tokenize=False,
                add_generation_prompt=True)
            before, after = text.split(marker, 1)
            return self._encode(before), self._encode(after)
        return [], self._encode(instruction)

    def windows(self, family: str, length: int, indices: list[int]
                ) -> tuple[list[list[int]], list[str], bool]:
        """Windows `indices` of `length` tokens, round-robin over the family's sources
        (indices past the last window wrap around)."""
        sources = self._load(family)
        order: list[tuple[str, int, list[int]]] = []
        chunk = 0
        while True:
            row = [(s.name, chunk, s.ids[chunk * length:(chunk + 1) * length]) for s in sources
                   if (chunk + 1) * length <= len(s.ids)]
            if not row:
                break
            order += row
            chunk += 1
        if not order:
            raise ValueError(f"no {family} source holds {length} tokens")
        picked = [order[i % len(order)] for i in indices]
        reused = max(indices) >= len(order)
        return [ids for _, _, ids in picked], [f"{n}#{c}" for n, c, _ in picked], reused

    def point(self, task: str, context: int, batch: int, temperature: float) -> PromptSet:
        """The prompts of one point: each exactly `context` tokens."""
        family = TASKS[task][0]
        before, after = self._wrap(task)
        body = context - len(before) - len(after)
        if body <= 0:
            raise ValueError(f"context {context} is shorter than the {task} wrapping")
        bodies, names, reused = self.windows(family, body,
                                             window_indices(batch, temperature))
        prompts = [before + b + after for b in bodies]
        return PromptSet(task, context, prompts, names, reused)


def load_tokenizer(target: str) -> Any:
    """The target folder's tokenizer, or None when it has none that loads."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target)
    except Exception:  # noqa: BLE001 - any failure means "no usable tokenizer"
        return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer by its vocabulary (size and a digest of the token -> id map)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{len(vocab)}-{digest}"

