"""`vllm-longspec train` on CPU: target K/V capture, anchor-offset positions, the training
attentions, chunked losses, data packing, a short training run, exact resume, DDP (2 gloo
processes via torchrun) and bad-input errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vllm_longspec.draft.checkpoint import build_draft_layer, load_draft_checkpoint
from vllm_longspec.testing.fixtures import (make_tiny_draft, make_tiny_target, make_tokenizer,
                                             make_word_corpus)
from vllm_longspec.train.attention import (lagged_causal_mask, lagged_cross_attention,
                                           make_cross_attend, make_self_attend,
                                           sliding_window_mask, windowed_self_attention)
from vllm_longspec.train.cli import main
from vllm_longspec.train.data import SequenceSampler, build_data
from vllm_longspec.train.dist import weights_digest
from vllm_longspec.train.loss import IGNORE_INDEX, lm_loss, next_token_labels
from vllm_longspec.train.positions import (MAX_ANCHORS, anchor_offset_positions, max_offset,
                                           plain_positions, shifted_positions)
from vllm_longspec.train.target_kv import FrozenTarget

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A small, fast target for training runs (the fixture's defaults are sized for vLLM's CPU kernels).
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def corpus(work) -> str:
    return make_word_corpus(str(work / "corpus"), num_docs=40)


@pytest.fixture(scope="module")
def small_target(work) -> str:
    # A bigram target (residual_scale 0): a draft can learn to agree with it in a few steps.
    return make_tiny_target(str(work / "small_target"), "llama", residual_scale=0.0, **SMALL)


def _train_args(target: str, corpus: str, output: str, *extra: str) -> list[str]:
    return ["--target", target, "--data", corpus, "--output", output, "--seq-len", "32",
            "--batch-size", "8", "--eval-tokens", "256", "--eval-every", "0",
            "--eval-long-offset", "2048", "--lr", "3e-3", "--log-every", "1", "--no-progress",
            *extra]


def _summary(output: str) -> dict:
    with open(os.path.join(output, "train_summary.json"), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- target K/V
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_captured_kv_reproduce_last_layer_attention(work, family):
    """Attention computed from the captured K/V (and queries rotated by the draft's RoPE
    adapter) equals the last layer's own attention output, with anchor-offset position jumps
    (which transformers would otherwise read as packed-sequence boundaries)."""
    target = FrozenTarget.load(make_tiny_target(str(work / f"kv_{family}"), family, seed=3))
    attn = target.attn
    seen = {}
    hooks = [attn.register_forward_pre_hook(
                 lambda m, a, kw: seen.__setitem__("hidden", kw.get("hidden_states", a and a[0])),
                 with_kwargs=True),
             attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0]))]
    try:
        b, s = 2, 24
        ids = torch.randint(0, 300, (b, s), generator=torch.Generator().manual_seed(0))
        positions = plain_positions(b, s)
        positions[0, 3:] += 5000  # anchor-offset: 3 anchors, then a jump
        positions[1, :] += 7      # uniform shift
        out = target(ids, positions)
    finally:
        for h in hooks:
            h.remove()
    hq, hk, d = (target.arch.num_attention_heads, target.arch.num_key_value_heads,
                 target.arch.head_dim)
    assert out.k.shape == (b, s, hk, d) and out.v.shape == (b, s, hk, d)
    q = attn.q_proj(seen["hidden"]).reshape(b * s, hq * d)
    q, _ = target.rope(positions.reshape(-1), q, None)
    q = q.view(b, s, hq, d).transpose(1, 2)
    k = out.k.transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    v = out.v.transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    o = attn.o_proj(o.reshape(b, s, hq * d))
    torch.testing.assert_close(o, seen["out"], atol=1e-5, rtol=1e-5)
    # The final hidden states give the model's own logits at the same positions.
    with torch.no_grad():
        logits = target.model(input_ids=ids, position_ids=positions,
                              attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(target.lm_head(out.hidden), logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- positions
def test_anchor_offset_positions_structure():
    rng = random.Random(0)
    seq_len, max_len = 64, 8192
    high = max_offset(seq_len, max_len)
    assert high == min(30000, max_len - 1000) - seq_len
    assert max_offset(100, 32768) == 30000 - 100
    assert max_offset(5000, 4096) == 0
    anchors_seen, offsets = set(), []
    for _ in range(40):
        pos = anchor_offset_positions(8, seq_len, max_len=max_len, rng=rng)
        assert pos.shape == (8, seq_len) and pos.dtype == torch.long
        for row in pos.tolist():
            # the anchors: 0..s-1; then consecutive positions shifted by one offset
            s = next((i for i, p in enumerate(row) if p != i), seq_len)
            offset = row[-1] - (seq_len - 1)
            if s == seq_len:  # offset 0: indistinguishable from plain
                assert offset == 0
                continue
            assert 0 <= s <= MAX_ANCHORS
            assert row[s:] == [i + offset for i in range(s, seq_len)]
            assert 0 < offset <= high
            anchors_seen.add(s)
            offsets.append(offset)
    assert anchors_seen == set(range(MAX_ANCHORS + 1))
    assert max(offsets) > high // 2  # spread over the range, not stuck near 0

    plain = plain_positions(3, seq_len)
    assert torch.equal(anchor_offset_positions(3, seq_len, max_len=max_len, rng=rng,
                                               enabled=False), plain)
    # long sequences (> threshold) keep plain positions; at the threshold they are shifted
    assert torch.equal(anchor_offset_positions(3, 100, max_len=max_len, rng=rng, threshold=99),
                       plain_positions(3, 100))
    at = anchor_offset_positions(64, 100, max_len=max_len, rng=random.Random(1), threshold=100)
    assert not torch.equal(at, plain_positions(64, 100))
    # a target too short for any offset: plain
    assert torch.equal(anchor_offset_positions(2, 64, max_len=1000, rng=rng),
                       plain_positions(2, 64))

    long = shifted_positions(2, 8, 16384)
    assert long[0].tolist() == [0, 1, 2, 3, 16388, 16389, 16390, 16391]


# --------------------------------------------------------------------------- attention masks
def test_mask_semantics_explicit():
    m = sliding_window_mask(6, 3).int().tolist()
    assert m[0] == [1, 0, 0, 0, 0, 0]
    assert m[1] == [1, 1, 0, 0, 0, 0]
    assert m[2] == [1, 1, 1, 0, 0, 0]
    assert m[3] == [0, 1, 1, 1, 0, 0]  # keys (3-3, 3] = 1, 2, 3
    assert m[5] == [0, 0, 0, 1, 1, 1]
    c = lagged_causal_mask(5, 2).int().tolist()
    assert c[0] == [0, 0, 0, 0, 0] and c[1] == [0, 0, 0, 0, 0]
    assert c[2] == [1, 0, 0, 0, 0]      # index 2 sees target K/V 0..0
    assert c[4] == [1, 1, 1, 0, 0]
    assert lagged_causal_mask(3, 1).int().tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]


def _visible_sets(attend_out: torch.Tensor) -> list[list[int]]:
    """With q = 0 the attention is uniform over the visible keys; with V[j] = one-hot(j) the
    output row i is nonzero exactly at the keys query i sees."""
    return [torch.nonzero(row > 1e-6).flatten().tolist() for row in attend_out]


@pytest.mark.parametrize("chunk", [4, 1024])
def test_sliding_window_attention_sees_exactly_the_window(chunk):
    s, window, hq, hk = 13, 3, 4, 2
    q = torch.zeros(1, s, hq, s)
    k = torch.randn(1, s, hk, s)
    v = torch.eye(s).view(1, s, 1, s).expand(1, s, hk, s).contiguous()
    out = windowed_self_attention(q, k, v, window, chunk=chunk)
    for head in range(hq):
        sets = _visible_sets(out[0, :, head])
        assert sets == [list(range(max(0, i - window + 1), i + 1)) for i in range(s)]
    # random inputs: chunked == dense masked reference (GQA)
    q, k, v = torch.randn(2, s, hq, 8), torch.randn(2, s, hk, 8), torch.randn(2, s, hk, 8)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
        v.transpose(1, 2).repeat_interleave(2, 1), attn_mask=sliding_window_mask(s, window))
    torch.testing.assert_close(windowed_self_attention(q, k, v, window, chunk=chunk),
                               ref.transpose(1, 2))
    # window >= length: plain causal
    full = windowed_self_attention(q, k, v, s, chunk=chunk)
    causal = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
        v.transpose(1, 2).repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(full, causal.transpose(1, 2))


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_lagged_cross_attention_sees_up_to_i_minus_lag(lag):
    s, hq, hk = 9, 4, 2
    q = torch.zeros(1, s, hq, s)
    k = torch.randn(1, s, hk, s)
    v = torch.eye(s).view(1, s, 1, s).expand(1, s, hk, s).contiguous()
    out = lagged_cross_attention(q, k, v, lag)
    for head in range(hq):
        sets = _visible_sets(out[0, :, head])
        assert sets == [list(range(0, i - lag + 1)) for i in range(s)]  # [] for i < lag
    assert torch.equal(out[:, :lag], torch.zeros_like(out[:, :lag]))
    # random inputs, batch 2, flattened callables == dense masked reference
    b, d = 2, 8
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d), torch.randn(b, s, hk, d)
    mask = lagged_causal_mask(s, lag)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
        v.transpose(1, 2).repeat_interleave(2, 1), attn_mask=mask).transpose(1, 2)
    ref[:, :lag] = 0  # fully masked rows: zeros, not SDPA's NaN/uniform
    got = make_cross_attend(k, v, lag)(q.reshape(b * s, hq, d)).view(b, s, hq, d)
    torch.testing.assert_close(got, ref)
    self_got = make_self_attend(b, s, 3)(q.reshape(b * s, hq, d), k.reshape(b * s, hk, d),
                                         v.reshape(b * s, hk, d)).view(b, s, hq, d)
    torch.testing.assert_close(self_got, windowed_self_attention(q, k, v, 3))
    # lag beyond the sequence: all zeros
    assert torch.count_nonzero(lagged_cross_attention(q, k, v, s)) == 0


# --------------------------------------------------------------------------- loss and data
@pytest.mark.parametrize("kind", ["ce", "distill"])
def test_chunked_loss_equals_full_loss(kind):
    torch.manual_seed(0)
    n, h, vocab = 37, 16, 50
    head = torch.nn.Linear(h, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(n, h, requires_grad=True)
    target_hidden = torch.randn(n, h)
    ids = torch.randint(0, vocab, (1, n))
    labels = next_token_labels(ids).reshape(-1)
    assert labels[-1] == IGNORE_INDEX and torch.equal(labels[:-1], ids[0, 1:])
    total, count = lm_loss(hidden, head, kind, labels=labels, target_hidden=target_hidden,
                           chunk=8)
    (total / count).backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)
    if kind == "ce":
        ref = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        assert count == n - 1
    else:
        p_t = head(target_hidden).softmax(-1)
        ref = (p_t * (p_t.log() - logits.log_softmax(-1))).sum(-1).mean()
        assert count == n
    ref.backward()
    torch.testing.assert_close(total / count, ref)
    torch.testing.assert_close(grad, hidden.grad)


def test_data_packing_and_split(tmp_path):
    make_tokenizer(str(tmp_path / "tok"), 320)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    eos = tok.eos_token_id
    docs = [f"document number {i} " * 3 for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    sub = tmp_path / "sub"
    sub.mkdir()
    for i, d in enumerate(docs[10:]):
        (sub / f"{i}.txt").write_text(d)
    (sub / "blob.bin").write_bytes(b"\x00\x01binary")
    data = build_data([str(tmp_path / "*.jsonl"), str(sub)], tok, eos_id=eos, seq_len=16,
                      eval_tokens=100, seed=0)
    st = data.stats
    assert st["documents"] == 20 and st["split"] == "documents"
    assert data.train.shape[1] == 16 and data.eval.shape[1] == 16
    assert 100 // 16 == data.eval.shape[0]
    total = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert st["tokens"] == total
    assert int((data.train == eos).sum()) + int((data.eval == eos).sum()) <= 20
    decode = lambda t: tok.decode(t.flatten().tolist())  # noqa: E731
    held_out = [d for d in docs if d in decode(data.eval)]
    assert held_out and not any(d in decode(data.train) for d in held_out)
    # the sampler visits every row once per epoch, deterministically
    sampler = SequenceSampler(data.train.shape[0], seed=0)
    rows = sampler.rows(0, data.train.shape[0]).tolist()
    assert sorted(rows) == list(range(data.train.shape[0]))
    again = SequenceSampler(data.train.shape[0], seed=0)
    assert sampler.rows(3, 4).tolist() == again.rows(3, 4).tolist()


# --------------------------------------------------------------------------- training runs
def test_training_reduces_loss_and_improves_agreement(small_target, corpus, work):
    out = str(work / "run_distill")
    assert main(_train_args(small_target, corpus, out, "--steps", "25", "--loss", "distill",
                            "--eval-every", "10")) == 0
    s = _summary(out)
    assert s["completed"] and s["steps"] == 25 and s["tokens_per_s"] > 0
    losses = [loss for _, loss in s["loss_history"]]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    for pos in ("short", "long"):
        before, after = s["eval_initial"][pos], s["eval"][pos]
        assert after["top1"] > before["top1"] + 0.1, (pos, before, after)
        assert after["accept"] > before["accept"] + 0.05, (pos, before, after)
    assert [e["step"] for e in s["eval_history"]] == [0, 10, 20, 25]

    # The published-layout draft reloads and equals the trained weights.
    ckpt = load_draft_checkpoint(out)
    assert ckpt.window == 512 and ckpt.config["longspec"]["loss"] == "distill"
    layer = build_draft_layer(ckpt)
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert state["step"] == 25
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, state["draft"][name]), name
    assert weights_digest(layer) == s["rank_weight_digests"][0]
    # Token counts of the training data for draft_vocab_size (draft.vocab).
    from vllm_longspec.draft.vocab import load_token_counts

    counts = load_token_counts(out)
    assert counts is not None and counts.numel() == ckpt.arch.vocab_size
    assert 0 < int(counts.sum()) and int((counts > 0).sum()) > 10


def test_ce_training_and_bf16_save(small_target, corpus, work):
    out = str(work / "run_ce")
    assert main(_train_args(small_target, corpus, out, "--steps", "12", "--save-dtype", "bf16",
                            "--no-anchor-offset", "--window", "8", "--max-lag", "2")) == 0
    s = _summary(out)
    losses = [loss for _, loss in s["loss_history"]]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert s["eval"]["short"]["ce"] < s["eval_initial"]["short"]["ce"]
    ckpt = load_draft_checkpoint(out)
    assert ckpt.window == 8
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict.values())


def test_resume_continues_from_saved_step(small_target, corpus, work):
    straight, resumed = str(work / "straight"), str(work / "resumed")
    common = ("--steps", "6", "--warmup", "2")
    assert main(_train_args(small_target, corpus, straight, *common)) == 0
    assert main(_train_args(small_target, corpus, resumed, *common, "--stop-at-step", "3")) == 0
    first = _summary(resumed)
    assert not first["completed"] and first["steps"] == 3
    assert not os.path.exists(os.path.join(resumed, "model.safetensors"))
    assert main(_train_args(small_target, corpus, resumed, *common, "--resume")) == 0
    second = _summary(resumed)
    assert second["completed"] and second["start_step"] == 3 and second["steps_this_run"] == 3
    assert [step for step, _ in second["loss_history"]] == [1, 2, 3, 4, 5, 6]
    # model, optimizer, schedule and data order restored: the same weights as without a break
    a = build_draft_layer(load_draft_checkpoint(straight)).state_dict()
    b = build_draft_layer(load_draft_checkpoint(resumed)).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6, msg=name)
    assert second["eval_initial"] == _summary(straight)["eval_initial"]


def test_init_draft_starts_from_existing_draft(small_target, corpus, work, capsys):
    init = make_tiny_draft(str(work / "init_draft"), small_target, window=16, init_std=0.05)
    out = str(work / "from_init")
    assert main(_train_args(small_target, corpus, out, "--steps", "1", "--lr", "1e-12",
                            "--eval-tokens", "0", "--init-draft", init)) == 0
    s = _summary(out)
    assert s["window"] == 16 and s["eval"] is None  # the window comes with the draft
    before = build_draft_layer(load_draft_checkpoint(init)).state_dict()
    after = build_draft_layer(load_draft_checkpoint(out)).state_dict()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-8, rtol=0, msg=name)
    # a draft made for another target is refused
    other = make_tiny_target(str(work / "other_target"), "llama")
    wrong = make_tiny_draft(str(work / "wrong_draft"), other)
    capsys.readouterr()
    assert main(_train_args(small_target, corpus, str(work / "wrong"), "--steps", "1",
                            "--init-draft", wrong)) == 2
    assert "another target" in capsys.readouterr().err


_DDP_DRIVER = """
import json, runpy, sys
import torch.distributed as dist
runs = json.load(open(sys.argv[1]))
# One process group for both runs (main() joins an existing group and leaves it to its owner).
dist.init_process_group("gloo")
sys.argv = ["vllm_longspec.train", *runs["ddp"]]  # as `torchrun -m vllm_longspec.train ...`
try:
    runpy.run_module("vllm_longspec.train", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 0, e.code
from vllm_longspec.train.cli import main
assert main(runs["fsdp"]) == 0
dist.destroy_process_group()
"""


def test_ddp_and_fsdp_two_gloo_processes(small_target, corpus, work):
    """torchrun, 2 CPU processes: DDP ends with identical weights on both ranks; the FSDP run
    (target sharded over the ranks) trains exactly the same draft."""
    ddp, fsdp = str(work / "ddp"), str(work / "fsdp")
    args = lambda out, *extra: _train_args(  # noqa: E731
        small_target, corpus, out, "--steps", "3", "--device", "cpu", "--eval-long-offset", "0",
        *extra)
    runs = work / "ddp_runs.json"
    runs.write_text(json.dumps({"ddp": args(ddp), "fsdp": args(fsdp, "--fsdp")}))
    driver = work / "ddp_driver.py"
    driver.write_text(_DDP_DRIVER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(runs)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = _summary(ddp)
    assert s["world_size"] == 2 and s["completed"]
    assert s["tokens_per_step"] == 2 * 8 * 32
    digests = s["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and s["weights_in_sync"]
    trained = build_draft_layer(load_draft_checkpoint(ddp))
    assert weights_digest(trained) == digests[0]

    f = _summary(fsdp)
    assert f["world_size"] == 2 and f["weights_in_sync"]
    assert f["eval_initial"] == s["eval_initial"]
    sharded = build_draft_layer(load_draft_checkpoint(fsdp)).state_dict()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors(small_target, corpus, long_docs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(_train_args(small_target, str(tmp_path / "missing.txt"), out, "--steps", "1")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_train_args(small_target, str(tmp_path / "*.nothing"), out, "--steps", "1")) == 2
    assert "matches no file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(_train_args(small_target, str(tmp_path / "empty.txt"), out, "--steps", "1")) == 2
    assert "no text" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("ab")
    assert main(_train_args(small_target, str(tmp_path / "short.txt"), out, "--steps", "1",
                            "--eval-tokens", "0")) == 2
    assert "fewer than one --seq-len" in capsys.readouterr().err
    no_config = tmp_path / "not_a_model"
    no_config.mkdir()
    assert main(_train_args(str(no_config), corpus, out, "--steps", "1")) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(_train_args(small_target, corpus, out, "--steps", "1", "--resume",
                            str(tmp_path / "nope"))) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_train_args(small_target, corpus, out, "--steps", "1", "--eval-long-data",
                            long_docs, "--eval-long-len", "400", "--eval-long-tail", "16")) == 2
    assert "no long-evaluation document has >= 400 tokens" in capsys.readouterr().err
    assert main(_train_args(small_target, corpus, out, "--steps", "1", "--eval-long-data",
                            long_docs, "--eval-long-len", "64", "--eval-long-tail", "65")) == 2
    assert "--eval-long-len must be >= --eval-long-tail" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--target", small_target])  # --data/--output/--steps missing


# --------------------------------------------------------------------------- real long prefixes
LONG_WINDOW = 16  # the draft's self-attention window, well below the evaluated lengths
LONG_TAIL = 32


def _word_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "x"]
    text = ""
    while len(text) < chars:
        text += rng.choice(words) + rng.choice([" ", " ", "\n", "(", ")"])
    return text[:chars]


@pytest.fixture(scope="module")
def long_docs(work) -> str:
    """Three documents (byte tokenizer: one token per character): 300 tokens, 150 (only long
    enough for L = 128) and 50 (too short, skipped)."""
    folder = work / "long_docs"
    (folder / "books").mkdir(parents=True)
    (folder / "books" / "a.txt").write_text(_word_text(300, 1))
    (folder / "books" / "b.txt").write_text(_word_text(150, 2))
    (folder / "c.txt").write_text(_word_text(50, 3))
    return str(folder)


def _last_layer_cache(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF cache's last-layer (keys, values) as [S, Hk, D] (post-RoPE keys)."""
    if hasattr(cache, "layers"):
        k, v = cache.layers[-1].keys, cache.layers[-1].values
    elif hasattr(cache, "key_cache"):
        k, v = cache.key_cache[-1], cache.value_cache[-1]
    else:
        k, v = cache[-1]
    return k[0].transpose(0, 1), v[0].transpose(0, 1)


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Hq, D] over k, v [n, Hk, D] (all visible), GQA by repetition; [Hq, D]."""
    rep = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    weights = (torch.einsum("hd,jhd->hj", q, k) * q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("hj,jhd->hd", weights, v)


class _NaiveReference:
    """E[accept] and top-1 agreement per token of `ids` [S], the naive way: one pass of the HF
    model (its own KV cache and logits, not FrozenTarget's hook; causal, so token i's values are
    those of a pass over ids[:i + 1]) and, per token, the draft layer over the last `window`
    tokens only, query by query: self-attention over the earlier of those, cross-attention over
    the target's keys cross_from..t-1 for the token at index t (lag 1).
    `position_shift` / `cross_from` > 0 give deliberately wrong references."""

    def __init__(self, target, draft, ids: torch.Tensor, window: int):
        self.target, self.draft, self.ids, self.window = target, draft, ids, window
        with torch.no_grad():
            out = target.model(input_ids=ids[None], use_cache=True)
        self.logits = out.logits[0]
        self.k_all, self.v_all = _last_layer_cache(out.past_key_values)
        self.embeds = target.embed(ids[None])[0]

    @torch.no_grad()
    def __call__(self, index: int, position_shift: int = 0,
                 cross_from: int = 0) -> tuple[float, bool]:
        seg = list(range(max(0, index - self.window + 1), index + 1))
        k_all, v_all = self.k_all, self.v_all

        def self_attend(q, k, v):
            return torch.stack([_naive_attention(q[t], k[:t + 1], v[:t + 1])
                                for t in range(len(seg))])

        def cross_attend(q):
            rows = []
            for t, pos in enumerate(seg):
                if pos - 1 < cross_from:
                    rows.append(torch.zeros_like(q[t]))
                else:
                    rows.append(_naive_attention(q[t], k_all[cross_from:pos],
                                                 v_all[cross_from:pos]))
            return torch.stack(rows)

        positions = torch.tensor(seg) + position_shift
        hidden = self.draft(self.embeds[seg], positions, self.target.rope, self_attend,
                            cross_attend)[-1]
        d_logits, t_logits = self.target.lm_head(hidden), self.logits[index]
        accept = torch.minimum(d_logits.softmax(-1), t_logits.softmax(-1)).sum().item()
        return accept, bool(d_logits.argmax() == t_logits.argmax())


def test_long_prefix_eval_equals_naive_reference(work, long_docs):
    """Per token, the long-prefix evaluation equals a naive recomputation (HF KV cache, the draft
    over its window only, cross-attention over the whole prefix at the real positions), for the
    first tokens, for the last tokens before L = 128 and 256 and for those tokens alone; a
    reference with positions off by one or a cross-attention limited to the window differs."""
    from transformers import AutoTokenizer

    from vllm_longspec.draft.model import LongSpecDraftLayer, init_draft_weights
    from vllm_longspec.train.long_eval import LongPrefixEval, load_windows

    target = FrozenTarget.load(make_tiny_target(str(work / "long_target"), "qwen2", seed=4,
                                                **SMALL))
    draft = init_draft_weights(LongSpecDraftLayer(target.arch), seed=2, std=0.1)
    with torch.no_grad():  # peaky attention: a wrong position or key set shows in the output
        for proj in (draft.self_attn.q_proj, draft.self_attn.k_proj, draft.cross_attn.q_proj):
            proj.weight.mul_(4.0)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "long_target"))
    windows, stats = load_windows([long_docs], tokenizer, length=256, min_length=128)
    assert [w.name for w in windows] == ["books/a.txt", "books/b.txt"]
    assert stats["skipped_too_short"] == {"c.txt": 50}
    a = windows[0]
    assert a.ids.numel() == 256 and a.labels[-1] == tokenizer(_word_text(300, 1))["input_ids"][256]
    assert windows[1].ids.numel() == 150 and windows[1].labels[-1] == IGNORE_INDEX

    evaluation = LongPrefixEval(target, windows, lengths=[256, 128], tail=LONG_TAIL)
    per_token = evaluation.token_metrics(draft, window=LONG_WINDOW)
    assert set(per_token[0]) == {("head", None), ("tail", 128), ("tail", 256),
                                 ("no_prefix", 128), ("no_prefix", 256)}
    assert set(per_token[1]) == {("head", None), ("tail", 128), ("no_prefix", 128)}
    checks = [("head", None, range(0, LONG_TAIL)), ("tail", 128, range(96, 128)),
              ("tail", 256, range(224, 256))]
    reference = _NaiveReference(target, draft, a.ids, LONG_WINDOW)
    wrong_gap = {"shift": 0.0, "window_only": 0.0}
    for kind, length, indices in checks:
        got = per_token[0][(kind, length)]
        ref = [reference(i) for i in indices]
        torch.testing.assert_close(got.accept, torch.tensor([r[0] for r in ref]),
                                   atol=2e-5, rtol=0)
        assert got.top1.tolist() == [r[1] for r in ref]
        for i in list(indices)[-3:]:
            right = reference(i)[0]
            wrong_gap["shift"] = max(wrong_gap["shift"],
                                     abs(reference(i, position_shift=1)[0] - right))
            if i >= LONG_WINDOW:
                windowed = reference(i, cross_from=i - LONG_WINDOW + 1)[0]
                wrong_gap["window_only"] = max(wrong_gap["window_only"], abs(windowed - right))
    assert min(wrong_gap.values()) > 1e-3, wrong_gap  # the comparison above has teeth
    # The tail alone: the same tokens as their own sequence at positions 0..M-1.
    alone = _NaiveReference(target, draft, a.ids[224:256], LONG_WINDOW)
    torch.testing.assert_close(per_token[0][("no_prefix", 256)].accept,
                               torch.tensor([alone(i)[0] for i in range(LONG_TAIL)]),
                               atol=2e-5, rtol=0)

    summary = evaluation.evaluate(draft, window=LONG_WINDOW)
    assert summary["lengths"]["128"]["windows"] == 2 and summary["lengths"]["256"]["windows"] == 1
    for result in summary["lengths"].values():
        for kind in ("head", "tail", "no_prefix"):
            m = result[kind]
            assert 0.0 <= m["accept"] <= 1.0 and 0.0 <= m["top1"] <= 1.0, (kind, m)
            assert m["tokens"] == LONG_TAIL * result["windows"]
    head = per_token[0][("head", None)]
    assert summary["per_window"][0]["head"]["accept"] == pytest.approx(head.accept.mean().item())
    assert summary["per_window"][0]["tail"]["256"]["tokens"] == LONG_TAIL


def test_train_long_eval_flags_and_standalone_command(small_target, corpus, long_docs, work):
    """--eval-long-* end up in the summary (config, data, every evaluation), and the standalone
    command reproduces the final numbers from the saved draft."""
    from vllm_longspec.train.long_eval import main as long_eval_main

    out = str(work / "run_long_eval")
    assert main(_train_args(small_target, corpus, out, "--steps", "3", "--window", "8",
                            "--eval-long-data", long_docs, "--eval-long-len", "64", "128",
                            "--eval-long-tail", "16", "--eval-long-docs", "2")) == 0
    s = _summary(out)
    cfg = s["config"]
    assert cfg["eval_long_data"] == [long_docs] and cfg["eval_long_len"] == [64, 128]
    assert cfg["eval_long_tail"] == 16 and cfg["eval_long_docs"] == 2
    assert s["long_eval_data"]["windows"] == 2
    assert s["long_eval_data"]["window_tokens"] == {"books/a.txt": 128, "books/b.txt": 128}
    for record in (s["eval_initial"], s["eval"]):
        long_doc = record["long_doc"]
        assert long_doc["tail"] == 16 and set(long_doc["lengths"]) == {"64", "128"}
        for result in long_doc["lengths"].values():
            assert result["windows"] == 2
            assert 0.0 <= result["tail"]["accept"] <= 1.0
    assert "short" in s["eval"] and "long" in s["eval"]

    results = str(work / "long_eval.json")
    assert long_eval_main(["--target", small_target, "--draft", out, "--data", long_docs,
                           "--len", "64", "128", "--tail", "16", "--docs", "2", "--no-progress",
                           "--out", results]) == 0
    with open(results, encoding="utf-8") as f:
        standalone = json.load(f)["drafts"][out]
    assert standalone["window"] == 8 and standalone["anchor_offset"] is True
    for n, result in s["eval"]["long_doc"]["lengths"].items():
        for kind in ("head", "tail", "no_prefix"):
            for metric in ("accept", "top1", "ce"):
                assert standalone["lengths"][n][kind][metric] == pytest.approx(
                    result[kind][metric], abs=1e-5), (n, kind, metric)
