#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, as one prepared script.
# Usage: bash benchmarks/gpu_check.sh [stages]   (default: tests generate concurrency; logs in $OUT)
# Run it as two invocations, `tests generate` then `concurrency`, when one run may take at most
# about ten minutes.
# Stages: tests (tests/test_gpu.py + the CUDA checks of the sampler; small models, a few
# compilations), generate (bench_generate --preset 11b: transformers, ours eager, ours compiled +
# CUDA graph; the 11B decode step compiles for a minute or more), concurrency (bench_concurrency
# --preset 11b --compile at 1 and 8 requests: one compilation and capture per bucket), quantization
# (bench_quantization: the 11B unquantized, int8 and int4 with an 8k-token prompt + cache, weights,
# peak GPU memory, tokens/s; not in the default stages: writing the random 20 GB checkpoint and three
# loads of it take minutes of their own). Inductor's
# on-disk cache carries compiled kernels from the first invocation to the second.
# Each stage has its own time limit, so one that hangs or fails leaves the others' logs.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-tests generate concurrency}
PRESET=${PRESET:-11b}  # PRESET=narrow: a dry run of the script on a CPU
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
for stage in $stages; do
  start=$(date +%s)
  case $stage in
    tests) timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_sampling.py -k "gpu or graph or cuda" ;;
    generate) timeout 400 python3 benchmarks/bench_generate.py --preset "$PRESET" --repeats 3 ;;
    concurrency) timeout 560 python3 benchmarks/bench_concurrency.py --preset "$PRESET" --compile --levels 1,8 ;;
    quantization) timeout 560 python3 benchmarks/bench_quantization.py --preset "$PRESET" --text-only --prompt 8000 --new 64 --compile --folder "$OUT/checkpoint-$PRESET" ;;
    *) echo "unknown stage $stage"; false ;;
  esac 2>&1 | tee "$OUT/$stage.log"
  echo "== $stage: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
done
