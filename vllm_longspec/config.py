"""LongSpecConfig: every LongSpec option, typed, validated once, with documented defaults.

Users reach it three ways, all of which end in :meth:`LongSpecConfig.from_user_options`:

* ``speculative_config={"method": "longspec", "model": DRAFT, "num_speculative_tokens": K}``
  plus ``additional_config={"longspec": {...}}`` (the ``LLM`` API and ``--speculative-config``);
* ``--speculative-model longspec --longspec-draft DRAFT [--longspec-tree-widths ...]`` on the CLI;
* ``--speculative-model DRAFT`` where DRAFT is a LongSpec draft folder.

Inside vLLM the validated config travels as ``vllm_config.additional_config["longspec"]`` (a plain
dict, so it is hashed with the rest of the config and reaches every worker process).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# vLLM's rejection sampler and scheduler cap the draft tokens per request at 128.
MAX_DRAFT_TOKENS_PER_REQUEST = 128
MAX_WINDOW = 1 << 16
# Longest suffix prompt lookup tries (each suffix position is a few elementwise passes over the
# history, inside the drafting step).
MAX_PROMPT_LOOKUP = 16
DRAFT_WEIGHT_DTYPES = ("auto", "fp8")


class LongSpecConfigError(ValueError):
    """A LongSpec option is missing, unknown or out of range. The message names the option."""


@dataclass(frozen=True)
class LongSpecConfig:
    """Options of LongSpec speculative decoding.

    Attributes:
        draft: Folder of the LongSpec draft (``config.json`` + ``model.safetensors``, the layout
            of the published ``sail/longspec-*`` checkpoints) or a reference-trainer
            ``draft_model_weights.pth`` file beside a ``config.json``.
        num_speculative_tokens: Depth of speculation: draft tokens per request per step for a
            chain, tree levels for a tree.
        tree_widths: Nodes per tree level (LongSpec's dynamic beam tree, e.g. ``(4, 16, 16, 16,
            16)``). ``None`` means a chain of ``num_speculative_tokens`` tokens. When given, its
            length must equal ``num_speculative_tokens`` and its sum must not exceed 128.
        window: Tokens the draft's sliding-window self-attention sees (its own K/V ring buffer
            has exactly this many slots per request, whatever the context length).
        min_prompt_len: Requests whose prompt is shorter than this are decoded without
            speculation (LongSpec pays off on long prompts). 0 speculates on every request.
        draft_vocab_size: Draft over the most frequent N tokens of the draft's training data
            only (the lm_head rows of those tokens; see `draft.vocab`). Needs a draft trained
            by ``vllm-longspec train`` (it stores the token counts). None: the whole vocabulary.
            Never changes the output, only which drafts are proposed.
        prompt_lookup_max: Chains only. When > 0, a request whose last n committed tokens
            (n from this down to ``prompt_lookup_min``) occurred earlier in its prompt or output
            drafts the tokens that followed them there instead of the draft model's, as far as
            the copy reaches (`engine.prompt_lookup`; vLLM's ``ngram`` method drafts only this
            way). Pays off where outputs repeat the context (code, quoting summaries). 0: off.
        prompt_lookup_min: The shortest suffix that counts as a match (>= 1).
        draft_model_tokens: Chains with prompt lookup only: how many of the
            ``num_speculative_tokens`` the draft model drafts per step (default: all). The rest
            are drafted by prompt lookup alone, so a long copied continuation is verified in
            one step while the draft model's cost stays that of a short chain (e.g. 8 tokens
            per step, 4 of them from the draft model).
        draft_weight_dtype: ``"auto"``: the draft's matmuls use the weights as loaded (the
            target's dtype). ``"fp8"``: FP8 weights with per-channel scales for the per-level
            matmuls and a pruned head (`engine.draft_linear`; CUDA with compute capability
            >= 8.9): half the bytes each tree level reads. Never changes the output, only which
            drafts are proposed.
    """

    draft: str
    num_speculative_tokens: int
    tree_widths: tuple[int, ...] | None = None
    window: int = 512
    min_prompt_len: int = 0
    draft_vocab_size: int | None = None
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 2
    draft_model_tokens: int | None = None
    draft_weight_dtype: str = "auto"

    # Keys a user may put into additional_config["longspec"].
    USER_KEYS = ("draft", "tree_widths", "window", "min_prompt_len", "num_speculative_tokens",
                 "draft_vocab_size", "prompt_lookup_max", "prompt_lookup_min", "draft_model_tokens",
                 "draft_weight_dtype")

    def __post_init__(self) -> None:
        if not isinstance(self.draft, str) or not self.draft:
            raise LongSpecConfigError(
                "LongSpec needs a draft: give speculative_config['model'] (or --longspec-draft) "
                "the folder of a LongSpec draft checkpoint")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1,
                   MAX_DRAFT_TOKENS_PER_REQUEST)
        _check_int("window", self.window, 1, MAX_WINDOW)
        _check_int("min_prompt_len", self.min_prompt_len, 0, 1 << 40)
        if self.tree_widths is not None:
            widths = self.tree_widths
            if not isinstance(widths, tuple) or not widths:
                raise LongSpecConfigError(
                    f"tree_widths must be a non-empty list of positive integers, got {widths!r}")
            for level, width in enumerate(widths):
                _check_int(f"tree_widths[{level}]", width, 1, MAX_DRAFT_TOKENS_PER_REQUEST)
            if len(widths) != self.num_speculative_tokens:
                raise LongSpecConfigError(
                    f"tree_widths has {len(widths)} levels but num_speculative_tokens is "
                    f"{self.num_speculative_tokens}: the tree's depth must equal "
                    "num_speculative_tokens")
            if sum(widths) > MAX_DRAFT_TOKENS_PER_REQUEST:
                raise LongSpecConfigError(
                    f"tree too big: tree_widths {list(widths)} has {sum(widths)} draft nodes, "
                    f"vLLM verifies at most {MAX_DRAFT_TOKENS_PER_REQUEST} per request")
        if self.draft_vocab_size is not None:
            _check_int("draft_vocab_size", self.draft_vocab_size,
                       max(self.level_widths), 1 << 24)
        if self.draft_weight_dtype not in DRAFT_WEIGHT_DTYPES:
            raise LongSpecConfigError(
                f"draft_weight_dtype must be one of {', '.join(DRAFT_WEIGHT_DTYPES)}, got "
                f"{self.draft_weight_dtype!r}")
        _check_int("prompt_lookup_max", self.prompt_lookup_max, 0, MAX_PROMPT_LOOKUP)
        if self.prompt_lookup_max > 0:
            _check_int("prompt_lookup_min", self.prompt_lookup_min, 1, self.prompt_lookup_max)
            if self.is_tree:
                raise LongSpecConfigError(
                    f"prompt_lookup_max={self.prompt_lookup_max} works with chains only, but "
                    f"tree_widths {list(self.tree_widths or ())} makes a tree: drop one of them")
        if self.draft_model_tokens is not None:
            _check_int("draft_model_tokens", self.draft_model_tokens, 1,
                       self.num_speculative_tokens)
            if self.draft_model_tokens < self.num_speculative_tokens and (
                    self.prompt_lookup_max == 0 or self.tree_widths is not None):
                raise LongSpecConfigError(
                    f"draft_model_tokens={self.draft_model_tokens} < num_speculative_tokens="
                    f"{self.num_speculative_tokens} leaves tokens only prompt lookup can draft: "
                    "it needs a chain (no tree_widths) with prompt_lookup_max > 0")

    @property
    def is_tree(self) -> bool:
        return self.tree_widths is not None and any(w > 1 for w in self.tree_widths)

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens per request per step, as vLLM's scheduler must reserve them."""
        if self.tree_widths is None:
            return self.num_speculative_tokens
        return sum(self.tree_widths)

    @property
    def level_widths(self) -> tuple[int, ...]:
        """Nodes per level; a chain is a tree of width 1 at every level."""
        return self.tree_widths or (1,) * self.num_speculative_tokens

    @property
    def drafted_level_widths(self) -> tuple[int, ...]:
        """Nodes per level the draft model drafts (`level_widths` but for a chain shortened
        to ``draft_model_tokens``)."""
        if self.tree_widths is None and self.draft_model_tokens is not None:
            return (1,) * self.draft_model_tokens
        return self.level_widths

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.tree_widths is not None:
            data["tree_widths"] = list(self.tree_widths)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LongSpecConfig":
        data = dict(data)
        unknown = sorted(set(data) - set(cls.USER_KEYS))
        if unknown:
            raise LongSpecConfigError(
                f"unknown LongSpec option(s) {unknown}; known options: {list(cls.USER_KEYS)}")
        if data.get("tree_widths") is not None:
            widths = data["tree_widths"]
            if isinstance(widths, str):
                widths = _parse_int_list("tree_widths", widths)
            if not isinstance(widths, Sequence) or isinstance(widths, (str, bytes)):
                raise LongSpecConfigError(
                    f"tree_widths must be a list of positive integers, got {widths!r}")
            data["tree_widths"] = tuple(widths)
        return cls(**data)

    @classmethod
    def from_user_options(cls, draft: str | None, num_speculative_tokens: int | None,
                          options: Mapping[str, Any] | None) -> "LongSpecConfig":
        """Merges the speculative config's ``model``/``num_speculative_tokens`` with
        ``additional_config["longspec"]`` and validates the result."""
        if options is not None and not isinstance(options, Mapping):
            raise LongSpecConfigError(
                f'additional_config["longspec"] must be a JSON object, got {options!r}')
        merged: dict[str, Any] = dict(options or {})
        for key, value in (("draft", draft), ("num_speculative_tokens", num_speculative_tokens)):
            if value is None:
                continue
            if merged.get(key) not in (None, value):
                raise LongSpecConfigError(
                    f"{key} is given twice with different values: {merged[key]!r} in "
                    f'additional_config["longspec"] and {value!r} in the speculative config')
            merged[key] = value
        if merged.get("num_speculative_tokens") is None:
            widths = merged.get("tree_widths")
            if widths is None:
                raise LongSpecConfigError(
                    "num_speculative_tokens is required for LongSpec (the chain length, or the "
                    "tree depth when tree_widths is given)")
            if isinstance(widths, str):
                widths = _parse_int_list("tree_widths", widths)
            merged["num_speculative_tokens"] = len(widths)
        if "draft" in merged and isinstance(merged["draft"], str):
            merged["draft"] = os.path.abspath(os.path.expanduser(merged["draft"]))
        return cls.from_dict(merged)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LongSpecConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise LongSpecConfigError(f"{name}={value} is out of range [{low}, {high}]")


def _parse_int_list(name: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise LongSpecConfigError(f"{name} must be integers separated by commas, got {text!r}")
