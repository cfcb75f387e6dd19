"""Tiny models built in code (no hub): targets, drafts and an offline tokenizer.

Sizes respect vLLM's CPU attention (head sizes 32, 64, 80, ...). Weights are fp32 and
deliberately peaky (initializer_range 0.1), so greedy argmax has clear margins and fp32
losslessness tests compare exact tokens without near-ties.

Acceptance knobs:
  * ``make_tiny_target(..., residual_scale=0.0)`` zeroes every attention and MLP output
    projection: the target becomes a bigram model, ``argmax lm_head(norm(embed(x)))``;
  * ``make_tiny_draft(..., zero_outputs=True)`` gives a draft whose layer adds nothing, so it
    predicts ``argmax lm_head(embed(x))`` -- the same argmax when the target's final norm weight
    is all ones. Together: every drafted token is accepted. With ``residual_scale`` between 0
    and 1 the target drifts away from the bigram and acceptance is partial; a random draft gets
    almost nothing accepted.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import torch

from ..draft.checkpoint import save_draft_checkpoint
from ..draft.model import DraftArchitecture, LongSpecDraftLayer, init_draft_weights

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]


def make_tokenizer(folder: str, vocab_size: int) -> None:
    """A byte-level tokenizer (256 byte tokens + specials, no merges), saved with the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {len(vocab)}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token=None, pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(folder)


def make_tiny_target(folder: str, family: Literal["llama", "qwen2"] = "llama", *,
                     vocab_size: int = 320, seed: int = 0, residual_scale: float = 1.0,
                     max_position_embeddings: int = 8192, init_std: float = 0.1,
                     **overrides) -> str:
    """Writes a random Llama or Qwen2 causal LM (fp32, safetensors) with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = {**TINY, **overrides}
    common = dict(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                  rms_norm_eps=1e-6, initializer_range=init_std, dtype="float32",
                  bos_token_id=None, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                  rope_theta=10000.0, **shape)
    if family == "llama":
        config = LlamaConfig(tie_word_embeddings=False, attention_bias=False, **common)
    elif family == "qwen2":
        config = Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common)
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.normal_(0.0, init_std)
            else:
                param.normal_(0.0, init_std)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    # The eos token of the tokenizer is one of its specials; the model's eos id is vocab-1,
    # which greedy decoding on random weights practically never produces.
    make_tokenizer(folder, vocab_size)
    _set_generation_eos(folder, vocab_size - 1)
    return folder


def _set_generation_eos(folder: str, eos_id: int) -> None:
    path = os.path.join(folder, "generation_config.json")
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data.update(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def read_hf_config(folder: str) -> dict:
    """A model folder's ``config.json`` as a dict."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def make_tiny_draft(folder: str, target_folder: str, *, seed: int = 1,
                    zero_outputs: bool = False, window: int = 512, init_std: float = 0.1) -> str:
    """Writes a LongSpec draft for `target_folder` in the published layout."""
    target_config = read_hf_config(target_folder)
    arch = DraftArchitecture.from_hf_config(target_config)
    layer = init_draft_weights(LongSpecDraftLayer(arch), seed=seed, std=init_std,
                               zero_outputs=zero_outputs)
    return save_draft_checkpoint(layer, folder, window=window, target_config=target_config)


def make_word_corpus(folder: str, num_docs: int, seed: int = 0,
                     repeats: tuple[int, int] = (5, 15)) -> str:
    """Text documents for training tests: each a random 6-word line repeated (learnable, and
    documents differ)."""
    import random

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "x"]
    for d in range(num_docs):
        line = " ".join(rng.choice(words) for _ in range(6)) + "\n"
        with open(os.path.join(folder, f"doc{d:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(line * rng.randint(*repeats))
    return folder
