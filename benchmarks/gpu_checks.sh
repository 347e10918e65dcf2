#!/usr/bin/env bash
# The GPU checks of the project, in one run on a CUDA machine (about 11 minutes on one H200):
#
#   1. step time and peak memory of converted snnTorch / SpikingJelly models against the
#      hosts' own models, eager and compiled (bench_compile.py, the reference shape and a
#      large batch), alone on the GPU so that nothing else shares it;
#   2. where the step time goes (profile_step.py: kernel launches, device time, syncs,
#      Dynamo graphs, CUDA graphs);
#   3. the CUDA tests (tests/test_cuda.py: the device against the CPU);
#   4. the first epochs of the full DVS Gesture paper protocol (49 frames, width 32, the
#      70-epoch schedule) for the SBNN and its surrogate twins, one process per method,
#      stopped after DEEP_SECONDS: the learning curves of the start of the protocol.
#
# Usage, from the repository root:
#   bash benchmarks/gpu_checks.sh DATA_DIR OUT_DIR
# DATA_DIR: the dvs_gesture_32 folder; OUT_DIR: where the logs go. PYTHON (default
# python3) must have torch with CUDA, snntorch, spikingjelly and this package importable.
set -u
DATA=${1:?usage: gpu_checks.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: gpu_checks.sh DATA_DIR OUT_DIR}
PY=${PYTHON:-python3}
BENCH_SECONDS=${BENCH_SECONDS:-250}
TEST_SECONDS=${TEST_SECONDS:-200}
PROFILE_SECONDS=${PROFILE_SECONDS:-150}
DEEP_SECONDS=${DEEP_SECONDS:-230}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

(
  nvidia-smi -L
  "$PY" -c "import torch, snntorch, spikingjelly; print('torch', torch.__version__, \
torch.cuda.get_device_name(), '| snntorch', snntorch.__version__)"
  cd benchmarks || exit 1
  end=$((SECONDS + BENCH_SECONDS))  # both batches share the budget, 128 first
  timeout $((end - SECONDS)) "$PY" bench_compile.py --device cuda --reps 30 --repeat 3 \
    --threads 8 --json "$OUT/bench_b128.json" || echo "bench_compile batch 128: exit $?"
  timeout $((end - SECONDS > 1 ? end - SECONDS : 1)) "$PY" bench_compile.py --device cuda \
    --reps 30 --repeat 3 --threads 8 --batch 2048 --json "$OUT/bench_b2048.json" \
    || echo "bench_compile batch 2048: exit $?"
) > "$OUT/bench.log" 2>&1
(
  cd benchmarks || exit 1
  timeout "$PROFILE_SECONDS" "$PY" profile_step.py --device cuda --cudagraphs --steps 3 \
    || echo "profile_step: exit $?"
) > "$OUT/profile.log" 2>&1

for method in sbnn twin twin-bn; do
  timeout "$DEEP_SECONDS" "$PY" benchmarks/dvs_deep_protocol.py --data-dir "$DATA" \
    --device cuda --width 32 --frame-stride 1 --frames 49 --epochs 70 --seeds 0 \
    --methods "$method" --threads 4 --out "$OUT/deep_$method.jsonl" \
    > "$OUT/deep_$method.log" 2>&1 &
done
timeout "$TEST_SECONDS" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  --durations=8 > "$OUT/tests.log" 2>&1
echo "pytest exit $?" >> "$OUT/tests.log"
wait
tail -n 3 "$OUT"/*.log
