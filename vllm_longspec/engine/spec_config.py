"""Turns the user's LongSpec request into what vLLM understands, before the engine starts.

vLLM's ``SpeculativeConfig.method`` is a closed ``Literal`` and rejects ``"longspec"``; its
open door for out-of-tree drafters is ``method="custom_class"`` with the proposer's import path
as ``model``. So ``{"method": "longspec", "model": DRAFT, "num_speculative_tokens": K}`` (or the
CLI's ``--speculative-model longspec --longspec-draft DRAFT``) becomes

    speculative_config = {"method": "custom_class", "model": PROPOSER_CLASS,
                          "num_speculative_tokens": <draft tokens per step>}
    additional_config["longspec"] = LongSpecConfig(...).to_dict()

after every check that can be made without loading weights: options, draft folder, draft
header, draft-vs-target shapes. A bad request fails here, with a message naming the problem.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..config import DRAFT_WEIGHT_DTYPES, LongSpecConfig, LongSpecConfigError
from ..draft.checkpoint import (check_draft_fits_target,
                                check_draft_weights, is_draft_folder, load_draft_header)
from ..draft.model import DraftArchitecture

PROPOSER_CLASS = "vllm_longspec.engine.proposer.LongSpecProposer"
METHOD = "longspec"
_OWN_KEYS = ("method", "model", "num_speculative_tokens")


def wants_longspec(spec: dict[str, Any] | None) -> bool:
    if not spec:
        return False
    method, model = spec.get("method"), spec.get("model")
    if method == METHOD or model == METHOD:
        return True
    return method is None and isinstance(model, str) and "/" in model and is_draft_folder(model)


def _user_options(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``additional_config["longspec"]`` (empty when absent)."""
    options = (additional_config or {}).get(METHOD)
    if options is not None and not isinstance(options, dict):
        raise LongSpecConfigError(
            f'additional_config["longspec"] must be a JSON object, got {options!r}')
    return dict(options or {})


def resolve_longspec(spec: dict[str, Any], additional_config: dict[str, Any] | None,
                     target_hf_config: Any) -> tuple[dict[str, Any], LongSpecConfig]:
    """Returns (vLLM speculative_config dict, validated LongSpecConfig).

    Raises:
        LongSpecConfigError / DraftCheckpointError naming the problem.
    """
    spec = {k.replace("-", "_"): v for k, v in spec.items()}
    options = _user_options(additional_config)
    draft = spec.get("model")
    if draft == METHOD:
        draft = None  # --speculative-model longspec: the draft comes from --longspec-draft
    if draft is None and "draft" not in options:
        raise LongSpecConfigError(
            "LongSpec needs a draft checkpoint: pass speculative_config['model'] "
            "(or --longspec-draft) the folder of a LongSpec draft")
    draft_path = os.path.abspath(os.path.expanduser(draft or options["draft"]))
    header = load_draft_header(draft_path)
    if "window" not in options and header.window is not None:
        options["window"] = header.window
    config = LongSpecConfig.from_user_options(draft_path, spec.get("num_speculative_tokens"),
                                              options)
    check_draft_fits_target(header.arch, DraftArchitecture.from_hf_config(target_hf_config),
                            draft_path)
    check_draft_weights(draft_path)
    _check_draft_vocab(config, header.arch.vocab_size)
    passthrough = {k: v for k, v in spec.items() if k not in _OWN_KEYS}
    vllm_spec = {"method": "custom_class", "model": PROPOSER_CLASS,
                 "num_speculative_tokens": config.num_draft_tokens, **passthrough}
    return vllm_spec, config


def _check_draft_vocab(config: LongSpecConfig, vocab_size: int) -> None:
    from ..draft.vocab import TOKEN_COUNTS_FILE, load_token_counts

    if config.draft_vocab_size is None:
        return
    if config.draft_vocab_size > vocab_size:
        raise LongSpecConfigError(
            f"draft_vocab_size={config.draft_vocab_size} exceeds the vocabulary ({vocab_size})")
    if load_token_counts(config.draft) is None:
        raise LongSpecConfigError(
            f"draft_vocab_size needs the draft's token counts, but {config.draft} has no "
            f"{TOKEN_COUNTS_FILE} (drafts trained by `vllm-longspec train` have it)")


def rewrite_engine_args(engine_args: Any, target_model_config: Any) -> None:
    """In place on vLLM ``EngineArgs``: LongSpec request -> custom_class + additional_config."""
    spec = engine_args.speculative_config
    if not wants_longspec(spec):
        return
    hf_config = getattr(target_model_config.hf_config, "text_config", None) \
        or target_model_config.hf_config
    vllm_spec, config = resolve_longspec(spec, engine_args.additional_config, hf_config)
    if config.tree_widths is not None:
        from ..compat.attention_backend import select_tree_backend

        select_tree_backend(engine_args)
    engine_args.speculative_config = vllm_spec
    engine_args.additional_config = {**(engine_args.additional_config or {}),
                                     METHOD: config.to_dict()}


# ------------------------------------------------------------------------------------ CLI
CLI_FLAGS = {
    "--speculative-model": dict(
        dest="speculative_model", default=None,
        help="'longspec' (with --longspec-draft) or the folder of a LongSpec draft: speculate "
             "with LongSpec."),
    "--longspec-draft": dict(dest="longspec_draft", default=None,
                             help="Folder of the LongSpec draft checkpoint."),
    "--num-speculative-tokens": dict(
        dest="longspec_num_speculative_tokens", type=int, default=None,
        help="LongSpec: draft tokens per step for a chain (the tree depth with "
             "--longspec-tree-widths). Default: 4 for a chain, the tree's depth for a tree."),
    "--longspec-tree-widths": dict(
        dest="longspec_tree_widths", default=None,
        help="LongSpec: nodes per tree level, e.g. 4,16,16,16,16 (default: a chain)."),
    "--longspec-window": dict(dest="longspec_window", type=int, default=None,
                              help="LongSpec: the draft's sliding window (default: the "
                                   "draft's own, else 512)."),
    "--longspec-min-prompt-len": dict(
        dest="longspec_min_prompt_len", type=int, default=None,
        help="LongSpec: prompts shorter than this are decoded without speculation."),
    "--longspec-draft-vocab-size": dict(
        dest="longspec_draft_vocab_size", type=int, default=None,
        help="LongSpec: draft over the N tokens most frequent in the draft's training data "
             "(needs the draft's token_counts.safetensors)."),
    "--longspec-prompt-lookup-max": dict(
        dest="longspec_prompt_lookup_max", type=int, default=None,
        help="LongSpec chains: draft the continuation of the longest earlier occurrence of the "
             "last N..--longspec-prompt-lookup-min tokens where there is one (0: off)."),
    "--longspec-prompt-lookup-min": dict(
        dest="longspec_prompt_lookup_min", type=int, default=None,
        help="LongSpec chains: the shortest suffix prompt lookup matches (default 2)."),
    "--longspec-draft-model-tokens": dict(
        dest="longspec_draft_model_tokens", type=int, default=None,
        help="LongSpec chains with prompt lookup: tokens per step the draft model drafts "
             "(default: all); the rest of --num-speculative-tokens come from prompt lookup."),
    "--longspec-draft-weight-dtype": dict(
        dest="longspec_draft_weight_dtype", default=None, choices=DRAFT_WEIGHT_DTYPES,
        help="LongSpec: 'fp8' runs the draft's per-level matmuls with FP8 weights (Hopper/Ada "
             "GPUs; half the bytes per tree level). Default: the target's dtype."),
}
DEFAULT_CHAIN_TOKENS = 4
# Flags that become the LongSpec option of the same name (--longspec-window -> "window"); the
# draft and the token count go into the speculative config instead.
OPTION_FLAG_KEYS = {kw["dest"]: kw["dest"].removeprefix("longspec_") for kw in CLI_FLAGS.values()
                    if kw["dest"].removeprefix("longspec_") in LongSpecConfig.USER_KEYS
                    and kw["dest"] not in ("longspec_draft", "longspec_num_speculative_tokens")}


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "LongSpec", "LongSpec speculative decoding (vllm-longspec plugin)")
    for flag, kwargs in CLI_FLAGS.items():
        if flag in getattr(parser, "_option_string_actions", {}):
            continue
        group.add_argument(flag, **kwargs)


def apply_cli_flags(engine_args: Any, args: argparse.Namespace) -> None:
    """Folds the LongSpec CLI flags into ``EngineArgs`` (vLLM ignores unknown attributes)."""
    model = getattr(args, "speculative_model", None)
    lone_flags = [f for f, kw in CLI_FLAGS.items()
                  if kw["dest"] != "speculative_model" and getattr(args, kw["dest"], None) is not None]
    if model is None:
        if lone_flags:
            raise LongSpecConfigError(
                f"{', '.join(lone_flags)} need --speculative-model longspec")
        return
    if engine_args.speculative_config:
        raise LongSpecConfigError("--speculative-model and --speculative-config are exclusive")
    options = _user_options(engine_args.additional_config)
    for dest, key in OPTION_FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            options[key] = value
    draft = getattr(args, "longspec_draft", None)
    if model != METHOD:
        if draft is not None and draft != model:
            raise LongSpecConfigError("--speculative-model PATH and --longspec-draft disagree")
        draft = model
    tokens = getattr(args, "longspec_num_speculative_tokens", None)
    if tokens is None and options.get("tree_widths") is None:
        tokens = DEFAULT_CHAIN_TOKENS
    spec: dict[str, Any] = {"method": METHOD, "model": draft}
    if tokens is not None:
        spec["num_speculative_tokens"] = tokens
    engine_args.speculative_config = spec
    engine_args.additional_config = {**(engine_args.additional_config or {}), METHOD: options}
