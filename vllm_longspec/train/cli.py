"""``vllm-longspec train`` / ``python -m vllm_longspec.train``: train a LongSpec draft.

    vllm-longspec train --target MODEL_DIR --data 'src/**/*.py' --output DRAFT_DIR --steps 1000
        [--eval-long-data BOOKS... --eval-long-len 16384 32768]   (real long-prefix evaluation)
    torchrun --nproc_per_node 8 -m vllm_longspec.train --target ... (DDP; add --fsdp for a target
    that does not fit one GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import TrainError
from .long_eval import DEFAULT_TAIL
from .loop import DEFAULT_WINDOW, TrainConfig, train
from .positions import DEFAULT_THRESHOLD


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser(prog: str = "vllm-longspec train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a LongSpec draft layer against a frozen target "
        "(anchor-offset positions, lagged cross-attention onto the target's last-layer K/V).")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--target", required=True, help="local Hugging Face folder of the target")
    io.add_argument("--data", required=True, nargs="+", metavar="FILE",
                    help="text/code files, folders or quoted globs ('src/**/*.py'); *.jsonl "
                         "files hold one JSON object per line (see --text-field)")
    io.add_argument("--output", required=True, help="output folder: the draft (published "
                    "layout), checkpoint/ and train_summary.json")
    io.add_argument("--text-field", default="text", help="JSONL field with the text (%(default)s)")
    io.add_argument("--max-tokens", type=_positive_int, default=None,
                    help="read at most about this many tokens of data (default: all)")
    io.add_argument("--init-draft", default=None, metavar="PATH",
                    help="start from an existing draft (folder or weights file)")
    io.add_argument("--resume", nargs="?", const="auto", default=None, metavar="STATE",
                    help="resume: alone, from OUTPUT/checkpoint if it exists (else start fresh); "
                         "or from the given state.pt / folder")
    io.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="dtype of the saved draft (%(default)s, as the published drafts)")

    run = p.add_argument_group("schedule")
    run.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps")
    run.add_argument("--seq-len", type=_positive_int, default=1024,
                     help="tokens per packed sequence (%(default)s)")
    run.add_argument("--batch-size", type=_positive_int, default=8,
                     help="sequences per micro-batch per process (%(default)s)")
    run.add_argument("--grad-accum", type=_positive_int, default=1,
                     help="micro-batches per optimizer step (%(default)s)")
    run.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (%(default)s)")
    run.add_argument("--min-lr-ratio", type=float, default=0.1,
                     help="cosine floor as a fraction of --lr (%(default)s)")
    run.add_argument("--warmup", type=int, default=None,
                     help="warm-up steps (default: 10%% of --steps)")
    run.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (%(default)s)")
    run.add_argument("--clip-grad", type=float, default=1.0,
                     help="gradient-norm clip, 0 for none (%(default)s)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--stop-at-step", type=_positive_int, default=None,
                     help="stop after this step of the --steps schedule, saving a resumable "
                          "checkpoint (e.g. to fit a job's time limit)")
    run.add_argument("--save-every", type=int, default=None,
                     help="checkpoint every N steps (default: at every evaluation)")
    run.add_argument("--log-every", type=_positive_int, default=10,
                     help="loss-history granularity in steps (%(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = p.add_argument_group("draft and objective")
    model.add_argument("--window", type=_positive_int, default=None,
                       help=f"self-attention window, the token itself included (default: "
                            f"--init-draft's, else {DEFAULT_WINDOW})")
    model.add_argument("--max-lag", type=_positive_int, default=5,
                       help="cross-attention lag drawn in 1..N per step (tree depth; %(default)s)")
    model.add_argument("--loss", choices=["ce", "distill"], default="ce",
                       help="ce: next token of the data; distill: KL to the target's "
                            "next-token distribution (%(default)s)")
    model.add_argument("--no-anchor-offset", action="store_true",
                       help="plain positions (ablation)")
    model.add_argument("--anchor-threshold", type=_positive_int, default=DEFAULT_THRESHOLD,
                       help="sequences longer than this keep plain positions (%(default)s)")

    ev = p.add_argument_group("held-out evaluation")
    ev.add_argument("--eval-every", type=int, default=200,
                    help="evaluate every N steps, 0 for only at the start and the end "
                         "(%(default)s)")
    ev.add_argument("--eval-tokens", type=int, default=32768,
                    help="held-out tokens, at most half the data (%(default)s)")
    ev.add_argument("--eval-long-offset", type=int, default=16384,
                    help="'long' evaluation: the first 4 tokens (the sink) keep positions 0..3, "
                         "the rest are shifted by this much; 0 to skip (%(default)s)")
    ev.add_argument("--eval-long-data", nargs="+", default=None, metavar="FILE",
                    help="real long-prefix evaluation (long_eval.py) over these long documents "
                         "(files, folders, globs, *.jsonl): one window of the first "
                         "max(--eval-long-len) tokens per document; the target reads it whole, "
                         "the draft cross-attends over all of it")
    ev.add_argument("--eval-long-len", nargs="+", type=_positive_int, default=[16384],
                    metavar="L", help="prefix lengths: each evaluates the tokens L-tail..L-1 "
                                      "against the documents' first tail tokens (%(default)s)")
    ev.add_argument("--eval-long-tail", type=_positive_int, default=DEFAULT_TAIL,
                    help="tokens per evaluated block (%(default)s)")
    ev.add_argument("--eval-long-docs", type=_positive_int, default=None,
                    help="at most this many long documents (default: all long enough)")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", default="auto",
                    help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:N (%(default)s)")
    hw.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="target dtype; bf16 also turns on bf16 autocast for the draft "
                         "(auto: bf16 on GPU, fp32 on CPU)")
    hw.add_argument("--fsdp", action="store_true",
                    help="shard the frozen target over the torchrun processes (FSDP) when it "
                         "does not fit one GPU; the draft always uses DDP")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        target=args.target, data=list(args.data), output=args.output, steps=args.steps,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, window=args.window,
        max_lag=args.max_lag, loss=args.loss, anchor_offset=not args.no_anchor_offset,
        anchor_threshold=args.anchor_threshold, eval_every=args.eval_every,
        eval_tokens=args.eval_tokens, eval_long_offset=args.eval_long_offset,
        eval_long_data=list(args.eval_long_data) if args.eval_long_data else None,
        eval_long_len=list(args.eval_long_len), eval_long_tail=args.eval_long_tail,
        eval_long_docs=args.eval_long_docs,
        save_every=args.save_every, stop_at_step=args.stop_at_step, log_every=args.log_every,
        seed=args.seed, device=args.device, dtype=args.dtype, save_dtype=args.save_dtype,
        resume=args.resume, fsdp=args.fsdp, init_draft=args.init_draft,
        max_tokens=args.max_tokens, text_field=args.text_field, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..draft.checkpoint import DraftCheckpointError

    try:
        summary = train(config_from_args(args))
    except (TrainError, DraftCheckpointError) as e:
        print(f"vllm-longspec train: error: {e}", file=sys.stderr)
        return 2
    if _is_main():
        printable = {k: _without_per_window(v) for k, v in summary.items()
                     if k not in ("loss_history", "eval_history", "config")}
        print(json.dumps(printable, indent=2, default=str))
    return 0


def _without_per_window(value: Any) -> Any:
    """An eval record without its long-prefix per-document rows (they stay in the JSON file)."""
    if isinstance(value, dict) and isinstance(value.get("long_doc"), dict):
        return {**value, "long_doc": {k: v for k, v in value["long_doc"].items()
                                      if k != "per_window"}}
    return value


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
