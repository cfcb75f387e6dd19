"""Serving reliability of `vllm serve --speculative-model longspec`: load, faults, bad input.

Starts a LongSpec server and the same server without speculation on 127.0.0.1 (or uses
running ones), sends rounds of mixed load with injected faults, checks every greedy output
against the plain server token for token and that the server returns to baseline after every
round, sends bad requests and tries broken start-ups, and writes a JSON report plus a summary
table. Exit status 0 means zero lost or corrupted outputs and every check passed.

    # CPU, CI scale (tiny fp32 models):
    python -m vllm_longspec_benchmarks.reliability --target T --draft D --out bench_out/rel
    # GPU scale:
    python -m vllm_longspec_benchmarks.reliability --target QWEN --draft DRAFT \\
        --dtype float32 --max-model-len 16384 --max-num-seqs 64 --concurrency 64 \\
        --requests 256 --rounds 3 --gpu-memory-utilization 0.4 --corpus /usr/lib/python3.11 \\
        --out bench_out/rel-h100
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import urllib.request
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("servers")
    s.add_argument("--target", required=True, help="target model folder (or hub name)")
    s.add_argument("--draft", required=True, help="LongSpec draft folder")
    s.add_argument("--num-speculative-tokens", type=int, default=3)
    s.add_argument("--tree-widths", default=None,
                   help="LongSpec token tree, e.g. 4,16,16 (default: a chain)")
    s.add_argument("--window", type=int, default=None)
    s.add_argument("--min-prompt-len", type=int, default=16,
                   help="short prompts decode without speculation (a fallback to measure)")
    s.add_argument("--max-model-len", type=int, default=1024)
    s.add_argument("--max-num-seqs", type=int, default=8)
    s.add_argument("--max-num-batched-tokens", type=int, default=None)
    s.add_argument("--dtype", default="float32",
                   help="float32 makes greedy outputs comparable exactly")
    s.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV-cache blocks (small: preemption under load)")
    s.add_argument("--block-size", type=int, default=None)
    s.add_argument("--gpu-memory-utilization", type=float, default=None)
    s.add_argument("--no-eager", action="store_true", help="allow torch.compile / CUDA graphs")
    s.add_argument("--inject-draft-errors", type=int, default=0, metavar="N",
                   help="every N-th drafting step raises (LONGSPEC_INJECT_DRAFT_ERRORS)")
    s.add_argument("--launcher", default="vllm", choices=["vllm", "vllm-longspec"])
    s.add_argument("--sequential", action="store_true",
                   help="run the plain server first, then the LongSpec one (one GPU)")
    s.add_argument("--spec-url", default=None, help="use this running LongSpec server")
    s.add_argument("--reference-url", default=None, help="use this running plain server")
    w = p.add_argument_group("load")
    w.add_argument("--concurrency", type=int, default=8)
    w.add_argument("--requests", type=int, default=32, help="requests per round")
    w.add_argument("--rounds", type=int, default=3)
    w.add_argument("--max-tokens", default="8,48", help="low,high")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--corpus", default=None,
                   help="folder of text files: prompts are slices of it (tokenized by the "
                        "server) instead of random token ids")
    w.add_argument("--token-range", default="0,256", help="random prompt token ids: low,high")
    b = p.add_argument_group("bad input")
    b.add_argument("--bad-starts", default="in-process",
                   choices=["in-process", "server", "none"],
                   help="how to try broken start-ups: vLLM's start-up checks in this process, "
                        "or a real `vllm serve` each (slower)")
    p.add_argument("--memory-growth-limit-mib", type=float, default=256.0)
    p.add_argument("--out", default="bench_out/reliability")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def _vocab_size(target: str) -> int | None:
    try:
        with open(os.path.join(target, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except OSError:
        return None
    config = config.get("text_config", config)
    return config.get("vocab_size")


def tokenize_corpus(base_url: str, model: str, folder: str, max_tokens: int) -> list[int]:
    """Text files of `folder` (recursively, sorted), tokenized by the server's /tokenize."""
    text, paths = "", sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text += f.read() + "\n"
        except (UnicodeDecodeError, OSError, IsADirectoryError):
            continue
        if len(text) > 6 * max_tokens:
            break
    body = json.dumps({"model": model, "prompt": text, "add_special_tokens": False}).encode()
    req = urllib.request.Request(base_url + "/tokenize", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["tokens"][:max_tokens]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from vllm_longspec.reliability.bad_inputs import bad_request_names, run_bad_requests
    from vllm_longspec.reliability.bad_starts import (BAD_START_LIST, StartContext,
                                                      refuse_as_server, refuse_in_process)
    from vllm_longspec.reliability.prom import scrape
    from vllm_longspec.reliability.report import build_report
    from vllm_longspec.reliability.rounds import (Endpoint, reference_outputs, run_round)
    from vllm_longspec.reliability.server import (ServerConfig, gpu_memory_used_mib, launcher,
                                                  start_servers)
    from vllm_longspec.reliability.workload import (WorkloadConfig, build_workload,
                                                    probe_request)

    import asyncio

    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    env = {"LONGSPEC_INJECT_DRAFT_ERRORS": str(args.inject_draft_errors)} \
        if args.inject_draft_errors else {}
    spec_config = ServerConfig(
        target=args.target, draft=args.draft, num_speculative_tokens=args.num_speculative_tokens,
        tree_widths=tuple(int(x) for x in args.tree_widths.split(",")) if args.tree_widths
        else None, window=args.window, min_prompt_len=args.min_prompt_len,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        enforce_eager=not args.no_eager, num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed, env=env)
    command = launcher(args.launcher)
    servers: dict[str, Any] = {}

    def endpoint(name: str, url: str | None, config: ServerConfig) -> Endpoint:
        if url:
            return Endpoint(url.rstrip("/"), config.target)
        if name not in servers:
            print(f"starting the {name} server ...", flush=True)
            servers.update(start_servers({name: config}, args.out, command))
        server = servers[name]
        return Endpoint(server.base_url, config.target, server.rss_bytes, server.alive,
                        gpu_memory_used_mib)

    def stop(name: str) -> None:
        if name in servers:
            servers.pop(name).stop()

    try:
        if not args.sequential and not (args.spec_url or args.reference_url):
            print("starting both servers ...", flush=True)
            servers.update(start_servers({"reference": spec_config.reference(),
                                          "longspec": spec_config}, args.out, command))
        reference = endpoint("reference", args.reference_url, spec_config.reference())
        corpus = None
        if args.corpus:
            corpus = tokenize_corpus(reference.base_url, reference.model, args.corpus,
                                     max_tokens=max(200_000, 20 * args.max_model_len))
            print(f"corpus: {len(corpus)} tokens from {args.corpus}")
        workload = WorkloadConfig.for_max_model_len(
            args.max_model_len, num_requests=args.requests, seed=args.seed,
            max_tokens=_pair(args.max_tokens), token_range=_pair(args.token_range))
        bad_names = bad_request_names(speculative=True)
        rounds_specs = [build_workload(workload, i, corpus, bad_names)
                        for i in range(args.rounds)]
        probe = probe_request(workload, corpus, length=max(40, args.min_prompt_len + 8))
        references = reference_outputs(
            reference, [s for specs in rounds_specs for s in specs] + [probe],
            concurrency=args.concurrency, max_model_len=args.max_model_len, progress=progress)
        if args.sequential:
            stop("reference")
        longspec = endpoint("longspec", args.spec_url, spec_config)
        vocab = _vocab_size(args.target)
        rounds = []
        for i, specs in enumerate(rounds_specs):
            r = run_round(longspec, specs, references, probe, index=i,
                          concurrency=args.concurrency, max_model_len=args.max_model_len,
                          vocab_size=vocab, progress=progress)
            rounds.append(r)
            print(f"round {i}: {r.requests} requests in {r.duration_s:.1f}s, outcomes "
                  f"{r.outcomes}, idle {r.idle.ok}, failures {len(r.failures)}", flush=True)
        bad_requests = asyncio.run(run_bad_requests(longspec.base_url, longspec.model,
                                                    args.max_model_len, speculative=True))
        final_metrics = scrape(longspec.base_url)
    finally:
        for name in list(servers):
            stop(name)

    bad_starts = []
    if args.bad_starts != "none":
        ctx = StartContext(args.target, args.draft, tempfile.mkdtemp(dir=args.out),
                           common=("--dtype", args.dtype, "--max-model-len",
                                   str(args.max_model_len), "--enforce-eager"))
        for case in BAD_START_LIST:
            result = (refuse_in_process(case, ctx) if args.bad_starts == "in-process"
                      else refuse_as_server(case, ctx, command))
            print(f"bad start {case.name}: {'refused' if result.ok else 'NOT REFUSED'} "
                  f"({result.seconds:.1f}s)", flush=True)
            bad_starts.append(result)

    report = build_report(
        config={"server": spec_config.to_dict(), "workload": workload.to_dict(),
                "concurrency": args.concurrency, "rounds": args.rounds,
                "bad_starts": args.bad_starts, "corpus": args.corpus},
        rounds=rounds, bad_requests=bad_requests, bad_starts=bad_starts,
        final_metrics=final_metrics, memory_growth_limit_mib=args.memory_growth_limit_mib)
    path = report.to_json(os.path.join(args.out, "reliability.json"))
    with open(os.path.join(args.out, "reliability.md"), "w", encoding="utf-8") as f:
        f.write(report.markdown() + "\n")
    print(report.markdown())
    print(f"health summary at the end: {report.health}")
    for failure in report.failures():
        print("FAIL", failure)
    print(f"report: {path}; {'PASS' if report.ok else 'FAIL'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
