#!/bin/bash
# gpu_e2e.sh — one device call of the end-to-end benchmark (benchmarks/README.md, "End-to-end
# benchmark"): installs the plugin wheel into vLLM's /tmp/site, waits for the Qwen conversion,
# then runs `bench_e2e` for $METHODS into $OUT/$NAME/ (NAME.json, NAME.md, NAME.log, 3 PNGs).
# Run from the project root on the GPU machine, after stage-vllm.sh and stage-qwen.sh --suffix:
#
#   run(command="METHODS=nospec,ngram4 NAME=part1 bash benchmarks/gpu_e2e.sh",
#       carry=[".stage/plugin", ".stage/data"], timeout_s=600)
#
# Env: METHODS (required), NAME (required), DRAFT (LongSpec draft folder; default
# /root/drafts/qwen15, else 'untrained'), PRESET (default --quick; '' = the full grid, then give
# CONTEXTS / BATCHES / TEMPS / TASKS to keep one call under 10 minutes), EXTRA (more flags),
# CALL_S (seconds this call may spend on engines, default 540: split over the methods as each
# child's time limit).
set -uo pipefail
repo=$(pwd)
: "${METHODS:?METHODS=...}" "${NAME:?NAME=...}"
. /tmp/vllm-env.sh || { echo "stage vLLM first (shared/gpu/stage-vllm.sh)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
  "$repo"/.stage/plugin/vllm_longspec-*.whl 2>&1 | grep -v -i "warning" | tail -2
[ -f /root/ship/qwen/wait.sh ] && bash /root/ship/qwen/wait.sh
export PYTHONPATH=/root/ship/qwen/suffix:$PYTHONPATH   # arctic_inference for `suffix`
draft=${DRAFT:-/root/drafts/qwen15}
[ -f "$draft/config.json" ] || draft=untrained
n=$(echo "$METHODS" | tr ',' '\n' | grep -c .)
child_s=$(( ${CALL_S:-540} / n ))
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p "$OUT/$NAME"
cd /tmp   # not the project root: its triton_kernels/ would shadow Triton's own package
# shellcheck disable=SC2086
python3 -m vllm_longspec_benchmarks.bench_e2e --target /root/models/qwen15 \
  --draft "$draft" --draft-model /root/models/qwen05 --methods "$METHODS" \
  --longtexts "$repo/.stage/data/longtexts.tar.xz" --code-dir /usr/lib/python3.12 \
  ${PRESET---quick} ${CONTEXTS:+--contexts $CONTEXTS} ${BATCHES:+--batches $BATCHES} \
  ${TEMPS:+--temperatures $TEMPS} ${TASKS:+--tasks $TASKS} --child-timeout "$child_s" \
  --name "$NAME" --out "$OUT/$NAME" ${EXTRA:-}
