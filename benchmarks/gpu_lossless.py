"""Greedy losslessness on a real model (GPU, bf16): LongSpec vs vLLM without speculation.

Runs the same batch of long code prompts (mixed lengths) through two engines -- plain decoding,
then LongSpec -- and compares the outputs token for token. In bf16, batched verification can
flip a near-tie, so for every divergence it prints the target's top-2 logprob gap at that
position (from the plain run): a real bug shows a large gap, a numerical flip a tiny one.

    python -m vllm_longspec_benchmarks.gpu_lossless --target /root/models/qwen15 --out out
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from typing import Any


def code_prompts(tokenizer: Any, code_dir: str, lengths: list[int]) -> list[list[int]]:
    files = sorted(glob.glob(os.path.join(code_dir, "**", "*.py"), recursive=True))
    text, ids = "", []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text += f"# ---- file: {os.path.relpath(path, code_dir)}\n{f.read()}\n"
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 8 * (sum(lengths) + 4096):
            break
    ids = tokenizer(text)["input_ids"]
    prompts, offset = [], 0
    for n in lengths:
        prompts.append(ids[offset:offset + n])
        offset += n
    return prompts


def run(target: str, prompts: list[list[int]], max_tokens: int, spec: dict | None,
        additional: dict | None, eager: bool, logprobs: int | None,
        max_model_len: int = 32768, gpu_memory_utilization: float = 0.45) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_longspec.compat.vllm_api import shutdown_llm, engine_counters

    kwargs: dict[str, Any] = dict(model=target, dtype="bfloat16", max_model_len=max_model_len,
                                  gpu_memory_utilization=gpu_memory_utilization,
                                  enforce_eager=eager, seed=0,
                                  max_num_seqs=8, enable_prefix_caching=True,
                                  disable_log_stats=False)
    if spec:
        kwargs.update(speculative_config=spec, additional_config=additional or {})
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=logprobs)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        elapsed = time.perf_counter() - start
        counters = engine_counters(llm)
    finally:
        shutdown_llm(llm)
        del llm
    result: dict[str, Any] = {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
                              "seconds": elapsed, "startup_s": startup, "counters": counters,
                              "model_runner": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "auto")}
    if logprobs:
        gaps = []
        for o in outs:
            per_token = []
            for entry in o.outputs[0].logprobs or []:
                ranked = sorted(entry.values(), key=lambda lp: lp.rank)
                per_token.append(ranked[0].logprob - ranked[1].logprob if len(ranked) > 1
                                 else float("inf"))
            gaps.append(per_token)
        result["top2_gap"] = gaps
    return result


def run_in_child(runner: str = "auto", **config: Any) -> dict:
    """`run` in a fresh process: vLLM keeps CUDA-graph memory pools per process, and a second
    engine capturing graphs in the same process trips PyTorch's allocator.

    Args:
        runner: "v1" / "v2" forces vLLM's model runner (``VLLM_USE_V2_MODEL_RUNNER``);
            "auto" lets vLLM choose."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(config, f)
        env = dict(os.environ)
        if runner != "auto":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
        proc = subprocess.run([sys.executable, "-m", "vllm_longspec_benchmarks.gpu_lossless",
                               "--child", spec_path, "--child-out", result_path], env=env)
        if proc.returncode != 0 or not os.path.exists(result_path):
            raise RuntimeError(f"engine child failed ({proc.returncode})")
        with open(result_path) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--draft", default=None, help="default: an untrained draft")
    parser.add_argument("--code-dir", default="/usr/lib/python3.12")
    parser.add_argument("--lengths", default="1024,4096,8192,16384")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="chain length (ignored with a tree)")
    parser.add_argument("--tree-widths", default=None,
                        help="verify token trees of these level widths, e.g. 4,16,16,16,16")
    parser.add_argument("--draft-vocab-size", type=int, default=None)
    parser.add_argument("--runner", choices=["auto", "v1", "v2"], default="auto",
                        help="vLLM model runner of the LongSpec engine (plain: vLLM's choice)")
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--target", required=False)
    args = parser.parse_args(argv)
    if args.child is not None:
        with open(args.child) as f:
            result = run(**json.load(f))
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0
    from transformers import AutoTokenizer

    os.makedirs(args.out, exist_ok=True)
    draft = args.draft
    if draft is None:
        from vllm_longspec.testing.fixtures import make_tiny_draft

        draft = make_tiny_draft(os.path.join(args.out, "untrained_draft"), args.target,
                                zero_outputs=True, init_std=0.02)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = code_prompts(tokenizer, args.code_dir, lengths)
    engine = dict(max_model_len=args.max_model_len,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    base = run_in_child(target=args.target, prompts=prompts, max_tokens=args.max_tokens,
                        spec=None, additional=None, eager=args.eager, logprobs=2, **engine)
    options: dict[str, Any] = {}
    if args.draft_vocab_size:
        options["draft_vocab_size"] = args.draft_vocab_size
    k = args.k
    if args.tree_widths:
        options["tree_widths"] = [int(w) for w in args.tree_widths.split(",")]
        k = len(options["tree_widths"])
    spec = run_in_child(target=args.target, prompts=prompts, max_tokens=args.max_tokens,
                        spec={"method": "longspec", "model": draft, "num_speculative_tokens": k},
                        additional={"longspec": options}, eager=args.eager, logprobs=None,
                        runner=args.runner, **engine)
    report = {"target": args.target, "draft": draft, "lengths": lengths, "k": k,
              "model_runner": args.runner,
              "tree_widths": options.get("tree_widths"), "max_tokens": args.max_tokens,
              "requests": []}
    exact = 0
    for i, (b, s) in enumerate(zip(base["token_ids"], spec["token_ids"])):
        first = next((j for j, (x, y) in enumerate(zip(b, s)) if x != y), None)
        if first is None and len(b) == len(s):
            exact += 1
        entry = {"prompt_len": lengths[i], "identical": first is None and len(b) == len(s),
                 "first_divergence": first,
                 "top2_logprob_gap_at_divergence": (base["top2_gap"][i][first]
                                                    if first is not None else None)}
        report["requests"].append(entry)
    report["exact_match_rate"] = exact / len(prompts)
    report["spec_counters"] = spec["counters"]
    report["seconds"] = {"plain": base["seconds"], "longspec": spec["seconds"],
                         "plain_startup": base["startup_s"], "longspec_startup": spec["startup_s"]}
    print(json.dumps(report, indent=2))
    with open(os.path.join(args.out, "gpu_lossless.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
