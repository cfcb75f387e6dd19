"""Configurations ``vllm serve --speculative-model longspec`` must refuse to start with.

Each case yields the ``vllm serve`` arguments of a broken set-up (malformed speculative config,
bad LongSpec options, a missing, truncated, corrupt or NaN/Inf draft, a draft for another
target) and a phrase the error must contain. Two ways to check a case:

* `refuse_as_server`: run the real command; it must exit non-zero, before serving, naming the
  problem (what a user sees; ~15-20 s per case on a small CPU);
* `refuse_in_process`: run ``vllm serve``'s own argument parsing and engine-config creation in
  this process (`compat.serve_api`), about a second per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

from . import bad_drafts
from .server import free_port


@dataclass(frozen=True)
class StartContext:
    """What the cases build on: a good target and draft, a scratch folder, common flags."""

    target: str
    draft: str
    workdir: str
    common: tuple[str, ...] = ("--dtype", "float32", "--max-model-len", "1024",
                               "--enforce-eager")


@dataclass(frozen=True)
class BadStart:
    """A broken start-up: `argv(ctx)` are the arguments after ``vllm serve``."""

    name: str
    what: str
    expect: str
    argv: Callable[[StartContext], list[str]]


def _longspec(*extra: str, draft: Callable[[StartContext], str] | None = None):
    def build(ctx: StartContext) -> list[str]:
        folder = draft(ctx) if draft is not None else ctx.draft
        return [ctx.target, "--speculative-model", "longspec", "--longspec-draft", folder,
                *extra, *ctx.common]
    return build


def _spec_config(text: Callable[[StartContext], str]):
    def build(ctx: StartContext) -> list[str]:
        return [ctx.target, "--speculative-config", text(ctx), *ctx.common]
    return build


def _broken(kind: str, **kwargs) -> Callable[[StartContext], str]:
    def make(ctx: StartContext) -> str:
        suffix = "".join(f"_{k}_{v}" for k, v in sorted(kwargs.items()))
        dst = os.path.join(ctx.workdir, f"draft_{kind}{suffix}")
        if kind == "another_target":
            return bad_drafts.for_another_target(ctx.target, dst, **kwargs)
        return getattr(bad_drafts, kind)(ctx.draft, dst, **kwargs)
    return make


BAD_START_LIST = [
    BadStart("speculative_config_not_json", "--speculative-config is not JSON", "speculative",
             _spec_config(lambda ctx: '{"method": "longspec", "model": ')),
    BadStart("zero_speculative_tokens", "num_speculative_tokens 0",
             "num_speculative_tokens=0 is out of range",
             _spec_config(lambda ctx: json.dumps({"method": "longspec", "model": ctx.draft,
                                                  "num_speculative_tokens": 0}))),
    BadStart("speculative_tokens_not_integer", 'num_speculative_tokens "four"',
             "num_speculative_tokens must be an integer",
             _spec_config(lambda ctx: json.dumps({"method": "longspec", "model": ctx.draft,
                                                  "num_speculative_tokens": "four"}))),
    BadStart("unknown_longspec_option", 'additional_config {"longspec": {"windw": 64}}',
             "unknown LongSpec option(s) ['windw']",
             _longspec("--additional-config", json.dumps({"longspec": {"windw": 64}}))),
    BadStart("longspec_options_not_object", 'additional_config {"longspec": [64]}',
             "must be a JSON object",
             _longspec("--additional-config", json.dumps({"longspec": [64]}))),
    BadStart("window_zero", "--longspec-window 0", "window=0 is out of range",
             _longspec("--longspec-window", "0")),
    BadStart("tree_widths_not_integers", "--longspec-tree-widths 4,x",
             "tree_widths must be integers", _longspec("--longspec-tree-widths", "4,x")),
    BadStart("tree_depth_mismatch", "--longspec-tree-widths 2,2 with 3 speculative tokens",
             "tree_widths has 2 levels",
             _longspec("--longspec-tree-widths", "2,2", "--num-speculative-tokens", "3")),
    BadStart("negative_min_prompt_len", "--longspec-min-prompt-len -1",
             "min_prompt_len=-1 is out of range", _longspec("--longspec-min-prompt-len", "-1")),
    BadStart("longspec_flag_without_longspec", "--longspec-window without --speculative-model",
             "need --speculative-model longspec",
             lambda ctx: [ctx.target, "--longspec-window", "64", *ctx.common]),
    BadStart("no_draft", "--speculative-model longspec without a draft",
             "needs a draft checkpoint",
             lambda ctx: [ctx.target, "--speculative-model", "longspec", *ctx.common]),
    BadStart("missing_draft", "a draft folder that does not exist", "does not exist",
             _longspec(draft=lambda ctx: os.path.join(ctx.workdir, "no_such_draft"))),
    BadStart("draft_without_weights", "a draft folder without weights", "has neither",
             _longspec(draft=_broken("without_weights"))),
    BadStart("truncated_checkpoint", "model.safetensors cut in half", "truncated or corrupt",
             _longspec(draft=_broken("truncated"))),
    BadStart("corrupt_checkpoint", "model.safetensors overwritten with garbage",
             "truncated or corrupt", _longspec(draft=_broken("corrupt"))),
    BadStart("nan_weights", "a NaN in the draft's weights", "contains NaN or Inf",
             _longspec(draft=_broken("with_bad_value", value=float("nan")))),
    BadStart("inf_weights", "an Inf in the draft's weights", "contains NaN or Inf",
             _longspec(draft=_broken("with_bad_value", value=float("-inf")))),
    BadStart("vocab_mismatch", "a draft for a target with another vocabulary",
             "made for another target: vocab_size",
             _longspec(draft=_broken("another_target", vocab_size=512))),
    BadStart("hidden_size_mismatch", "a draft for a target with another hidden size",
             "made for another target: hidden_size",
             _longspec(draft=_broken("another_target", hidden_size=512))),
    BadStart("head_layout_mismatch", "a draft for a target with other KV heads",
             "num_key_value_heads: draft 4",
             _longspec(draft=_broken("another_target", num_key_value_heads=4))),
]
BAD_STARTS = {case.name: case for case in BAD_START_LIST}


@dataclass
class BadStartResult:
    name: str
    what: str
    refused: bool          # the server did not start
    named_problem: bool    # ... and its error contains the expected phrase
    seconds: float
    message: str           # the last lines of the error output

    @property
    def ok(self) -> bool:
        return self.refused and self.named_problem

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok)


def _last_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def refuse_in_process(case: BadStart, ctx: StartContext) -> BadStartResult:
    """`vllm serve`'s start-up checks for `case`, in this process."""
    from ..compat.serve_api import serve_startup_error

    start = time.perf_counter()
    error = serve_startup_error(case.argv(ctx))
    seconds = time.perf_counter() - start
    return BadStartResult(case.name, case.what, refused=error is not None,
                          named_problem=error is not None and case.expect in error,
                          seconds=seconds, message=_last_lines(error or "accepted"))


def refuse_as_server(case: BadStart, ctx: StartContext, command: list[str],
                     timeout_s: float = 300.0) -> BadStartResult:
    """Runs ``command serve ARGS``; it must exit non-zero within `timeout_s`."""
    start = time.perf_counter()
    proc = subprocess.Popen(command + ["serve", *case.argv(ctx), "--host", "127.0.0.1",
                                       "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get(
                                "VLLM_CPU_KVCACHE_SPACE", "1")))
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        refused = proc.returncode != 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        refused = False  # still running: it started (or hung) instead of refusing
    seconds = time.perf_counter() - start
    return BadStartResult(case.name, case.what, refused=refused,
                          named_problem=case.expect in output, seconds=seconds,
                          message=_last_lines(output))
