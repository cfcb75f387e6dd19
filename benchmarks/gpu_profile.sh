#!/usr/bin/env bash
# Profiles decode steps on the GPU machine (after .stage/vllm and the plugin wheel are installed):
#   [PROFILE_ARGS="--draft-vocab-size 32768"] bash benchmarks/gpu_profile.sh OUT SHAPE CONTEXT VARIANT...
# Each variant runs in its own process (CUDA-graph pools are per process).
set -uo pipefail
out=$1; shape=$2; context=$3; shift 3
mkdir -p "$out"
for variant in "$@"; do
  (cd /tmp && VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 300 python3 -m vllm_longspec_benchmarks.profile_step \
     --shape "$shape" --context "$context" --variant "$variant" --out "$out/$shape-$context" ${PROFILE_ARGS:-} \
     > "$out/$shape-$context-$variant.log" 2>&1)
  echo "== $variant rc=$?"
  grep -A60 "^== $variant" "$out/$shape-$context-$variant.log" | head -70 || tail -30 "$out/$shape-$context-$variant.log"
done
