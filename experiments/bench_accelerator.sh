#!/usr/bin/env bash
# The issues' benchmarks for a lent accelerator, step by step:
#   experiments/bench_accelerator.sh OUT_DIR [STEP ...]
# STEPs (default: all four, about 13 minutes on one H200, compilation included; the device tool
# allows 10 minutes a call, so run it as two calls, e.g. `OUT bench_gpu bench_models` then
# `OUT bench_vmapped bench_influence`):
#   bench_gpu        teacher, distillation and influence rates and MFU (about 2 min)
#   bench_models     the five backbones at reference size, batch 1024 and 4096 (about 3.5 min)
#   bench_vmapped    vmapped candidate groups of 6 and 18 against the same members one after
#                    another, all five backbones (about 4 min)
#   bench_influence  jvp / vmap / ghost and the whole addressing step, B = 1024 and 4096
# Each step writes OUT_DIR/<step>.log (and <step>.json where the script has one) and is stopped
# at its time limit, after which the next step runs. Figures measured on one H200: docs/gpu.md.
out=${1:-/tmp/bench_accelerator}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bench_gpu bench_models bench_vmapped bench_influence)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
run_step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name $(date +%T)"
  timeout "$limit" "$py" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name rc ${PIPESTATUS[0]} $(date +%T)"
}
nvidia-smi -L 2>/dev/null
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
for s in "${steps[@]}"; do
  case $s in
    bench_gpu) run_step bench_gpu 180 experiments/bench_gpu.py --seconds=4 --json="$out/bench_gpu.json" ;;
    bench_models) run_step bench_models 270 experiments/bench_models.py --batch_sizes=1024,4096 \
      --steps=20 --json_out="$out/bench_models.json" ;;
    bench_vmapped) run_step bench_vmapped 300 experiments/bench_models.py --vmapped --groups=6,18 \
      --epochs=2 --json_out="$out/bench_vmapped.json" ;;
    bench_influence) run_step bench_influence 240 experiments/bench_influence.py --sizes=1024,4096 ;;
    *) echo "unknown step $s (bench_gpu, bench_models, bench_vmapped, bench_influence)"; exit 2 ;;
  esac
done
