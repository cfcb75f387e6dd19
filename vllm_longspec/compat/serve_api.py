"""`vllm serve`'s start-up checks, run in this process (for tests of bad configurations).

``vllm serve ARGS`` parses ARGS with the OpenAI server's parser (``make_arg_parser``: 0.32
``vllm.entrypoints.launchers.cli_args``, 0.26 ``vllm.entrypoints.openai.cli_args``), builds
``AsyncEngineArgs.from_cli_args(args)`` and calls ``create_engine_config()`` -- where LongSpec's
patches validate every option and the draft -- before it starts any engine process.
`serve_startup_error` runs exactly those steps, so a configuration it refuses is one that
``vllm serve`` refuses before starting, in about a second instead of a process start.
"""

from __future__ import annotations

import contextlib
import io


def _make_arg_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    return make_arg_parser(FlexibleArgumentParser())


def serve_startup_error(serve_argv: list[str]) -> str | None:
    """Returns the error `vllm serve *serve_argv` stops with before starting the engine, or
    None when the configuration is accepted. `serve_argv` excludes the words ``vllm serve``."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _make_arg_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(serve_argv)
    except SystemExit:  # argparse reports usage errors on stderr and exits
        return stderr.getvalue().strip() or "argument parsing failed"
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    try:
        AsyncEngineArgs.from_cli_args(args).create_engine_config()
    except Exception as e:  # vLLM and LongSpec raise ValueError / pydantic / own subclasses
        return f"{type(e).__name__}: {e}"
    return None
