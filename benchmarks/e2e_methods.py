"""The methods the end-to-end benchmark compares, as vLLM engine settings.

Names (``--methods``): ``nospec``; ``ngramK`` (prompt lookup, K drafts); ``suffix`` (suffix
decoding, vLLM picks its K); ``draftK`` (vLLM's ``draft_model`` with a separate plain draft);
``longspec-chain`` / ``longspec-chainK``, ``longspec-lookup`` / ``longspec-lookupK[dD]`` (a
chain with prompt lookup over the n-gram range of ``ngramK``, or up to ``--longspec-lookup-max``;
K tokens per step of which the draft model drafts D, default ``--longspec-k``, the rest by lookup
only) and ``longspec-tree`` (this plugin). A method whose
dependency is missing is *skipped* with the reason, never fatal.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METHODS = "nospec,ngram4,suffix,draft4,longspec-chain,longspec-tree"


@dataclass
class MethodOptions:
    """What the command line says about the speculative methods."""

    draft: str | None = None             # LongSpec draft folder
    draft_model: str | None = None       # plain draft model for draftK
    longspec_k: int = 4
    tree_widths: list[int] = field(default_factory=lambda: [4, 16, 16, 16, 16])
    draft_vocab_size: int | None = None
    longspec_config: dict[str, Any] = field(default_factory=dict)   # extra "longspec" keys
    additional_config: dict[str, Any] = field(default_factory=dict)  # extra top-level keys
    ngram_min: int = 2
    ngram_max: int = 4
    lookup_max: int | None = None  # longspec-lookup's longest suffix (None: ngram_max)
    suffix_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    name: str
    speculative_config: dict[str, Any] | None
    additional_config: dict[str, Any] | None
    skip_reason: str | None = None   # set: do not start an engine, record the reason
    repeats: int | None = None       # overrides --repeats (suffix: 1)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"speculative_config": self.speculative_config,
                "additional_config": self.additional_config, "notes": self.notes}


def _folder_reason(path: str | None, what: str, flag: str) -> str | None:
    if not path:
        return f"no {what} given ({flag})"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"{what} {path!r} has no config.json"
    return None


def build_method(name: str, opts: MethodOptions) -> Method:
    """The engine settings of method `name` (raises ValueError for an unknown name)."""
    if name == "nospec":
        return Method(name, None, None)
    if m := re.fullmatch(r"ngram(\d+)", name):
        spec = {"method": "ngram", "num_speculative_tokens": int(m.group(1)),
                "prompt_lookup_max": opts.ngram_max, "prompt_lookup_min": opts.ngram_min}
        return Method(name, spec, None)
    if name == "suffix":
        reason = None
        if importlib.util.find_spec("arctic_inference") is None:
            reason = ("arctic_inference is not importable (on the GPU machine put "
                      "/root/ship/qwen/suffix on PYTHONPATH)")
        return Method(name, {"method": "suffix", **opts.suffix_config}, None, reason, repeats=1,
                      notes=["one timing per point: suffix decoding caches every output, so a "
                             "repeat would find its own earlier answer"])
    if m := re.fullmatch(r"draft(\d+)", name):
        spec = {"method": "draft_model", "model": opts.draft_model,
                "num_speculative_tokens": int(m.group(1))}
        return Method(name, spec, None,
                      _folder_reason(opts.draft_model, "plain draft model", "--draft-model"))
    if m := re.fullmatch(r"longspec-(chain|tree|lookup)(\d*)(?:d(\d+))?", name):
        kind, k, d = m.group(1), m.group(2), m.group(3)
        if d is not None and (kind != "lookup" or not k):
            raise ValueError(f"{name}: 'dD' (draft-model tokens) needs longspec-lookupK")
        options: dict[str, Any] = dict(opts.longspec_config)
        if kind == "lookup":
            # longspec-lookupK[dD]: K tokens per step, the draft model drafting D of them
            # (default --longspec-k), the rest by lookup only.
            options.update(prompt_lookup_max=opts.lookup_max or opts.ngram_max,
                           prompt_lookup_min=opts.ngram_min)
            drafted = int(d) if d is not None else opts.longspec_k
            if k and int(k) > drafted:
                options["draft_model_tokens"] = drafted
        if opts.draft_vocab_size:
            options["draft_vocab_size"] = opts.draft_vocab_size
        if kind == "tree":
            if k:
                raise ValueError(f"{name}: the tree depth comes from --longspec-tree-widths")
            options["tree_widths"] = list(opts.tree_widths)
            depth = len(opts.tree_widths)
        else:
            depth = int(k) if k else opts.longspec_k
        spec = {"method": "longspec", "model": opts.draft, "num_speculative_tokens": depth}
        additional = {**opts.additional_config, "longspec": options}
        return Method(name, spec, additional,
                      _folder_reason(opts.draft, "LongSpec draft", "--draft"))
    raise ValueError(f"unknown method {name!r} (known: nospec, ngramK, suffix, draftK, "
                     "longspec-chain[K], longspec-lookup[K[dD]], longspec-tree)")


def build_methods(names: str, opts: MethodOptions) -> list[Method]:
    """Methods in command-line order, nospec first (the reference of every comparison)."""
    listed = [n.strip() for n in names.split(",") if n.strip()]
    if len(set(listed)) != len(listed):
        raise ValueError(f"--methods lists a method twice: {names}")
    listed.sort(key=lambda n: n != "nospec")
    return [build_method(n, opts) for n in listed]
