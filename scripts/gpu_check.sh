#!/usr/bin/env bash
# The GPU path checked and measured in one command (`make gpu-check`), in at most 8 minutes on one H200:
#   1. the tests marked gpu (tests/conftest.py) on CUDA: resident data and on-device crop/flip against
#      the CPU path, the teacher's stored outputs, trainer=gpu_fast with and without compile (no
#      training step waits for the device), a one-device DDP run;
#   2. the benchmark at full size (experiments/bench.py), its headline first: epoch (the 240-epoch CRD KD run
#      projected from measured epochs), then kd_step (ours, fast path and fp32, against the common
#      loop), then parity (fp32 against bf16-mixed: CE test accuracy, 3 seeds each, and the KD loss
#      at tau 4 from the teacher's bf16 logits), then images (populations of image students: 7 cnn
#      students on Fashion-MNIST shapes, and resnet20 students of one resnet56 on CIFAR shapes on the
#      fast path without compile, which a population does not take).
# Each step has its own time limit, printed before it starts: on a GPU, tests 140 s and benchmark 330 s,
# 8 minutes in all with start-up. The benchmark publishes after each measurement, so what finished
# is kept when a later one runs out of time. Exit status: 0 when every step passed.
#
#   scripts/gpu_check.sh [--out DIR]         on the GPU machine; DIR (default results/bench) receives
#                                            gpu_check.md and .json (the benchmark), gpu_check_tests.xml
#                                            (JUnit) and gpu_check.log (everything printed)
#   scripts/gpu_check.sh --cpu [--out DIR]   the same steps at toy size on the CPU (tests/test_gpu_check.py)
#   scripts/gpu_check.sh --wheels            here, before the GPU machine is called: wheels of the pinned
#                                            packages it lacks (hydra-core, omegaconf, antlr4) into .whl/
#
# On the GPU machine (python3 with torch, lightning, torchmetrics, no hydra or wandb), .whl/ carried:
#   bash scripts/gpu_check.sh --out $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=.whl
# What the GPU machine's Python lacks, at this project's pins (requirements/lock.txt).
MISSING="hydra-core omegaconf antlr4-python3-runtime"
GPU_TESTS=tests/test_performance.py

mode=gpu out=results/bench
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --wheels) mode=wheels ;;
    --out) out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    *) echo "error: unknown argument $1; use --cpu, --wheels or --out DIR" >&2; exit 2 ;;
  esac
  shift
done

pins() {  # the pinned requirement of each package in $MISSING, e.g. hydra-core==1.3.8
  for name in $MISSING; do
    grep -i "^$name==" requirements/lock.txt || { echo "error: $name is not pinned in requirements/lock.txt" >&2; return 1; }
  done
}

if [ $mode = wheels ]; then
  set -e
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # Wheels for the GPU machine's CPython 3.12 on x86-64 Linux; these are pure Python (py3-none-any).
  for pin in $(pins); do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$pin" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$pin"  # antlr4 4.9.3 is a source release only
  done
  for wheel in "$WHEELS"/*.whl; do
    case $wheel in
      *-py3-none-any.whl|*-cp312-*manylinux*x86_64.whl) echo "$wheel" ;;
      *) echo "error: $wheel does not run on CPython 3.12 x86-64" >&2; exit 1 ;;
    esac
  done
  echo "carry $WHEELS to the GPU machine (device run: carry [\"$WHEELS\"])"
  exit 0
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)

check() {
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  # torch reads it once, at its first cuBLAS call; deterministic tests need it set before (docs/determinism.md).
  export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
  export KD_ROOT=$(mktemp -d -t kd-gpu-check-XXXX)  # runs, teachers and caches of the checks, not the repo's
  if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "error: hydra-core is missing and $WHEELS/ has no wheels: run scripts/gpu_check.sh --wheels here and carry $WHEELS"; return 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KD_ROOT/site" "$WHEELS"/*.whl || return 2
    export PYTHONPATH="$PYTHONPATH:$KD_ROOT/site"
    echo "== no hydra here: installed the carried wheels ($WHEELS) into $KD_ROOT/site"
  fi
  if [ $mode = gpu ]; then
    # One round: a GPU machine is not shared, so its timings need no median over rounds.
    device=cuda tests_limit=140 bench_limit=330 bench_args=(--device cuda --rounds 1)
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device is visible to torch')" || return 2
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  else
    device=cpu tests_limit=600 bench_limit=600 bench_args=(--device cpu --smoke)
  fi
  "$PY" -c "import torch, lightning, torchmetrics, hydra, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| lightning', lightning.__version__, '| torchmetrics', torchmetrics.__version__, '| hydra', hydra.__version__)"
  echo "== plan: gpu tests at most ${tests_limit}s, then benchmark at most ${bench_limit}s (epoch, kd_step, parity, images); CUBLAS_WORKSPACE_CONFIG=$CUBLAS_WORKSPACE_CONFIG"

  local failed=()
  step() {  # step NAME LIMIT COMMAND...: run it under its time limit, note a failure and go on
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    [ $status -eq 124 ] && echo "== $name: stopped at its time limit"
    [ $status -ne 0 ] && failed+=("$name (exit $status)")
    echo "== $name: exit $status after $((SECONDS - start))s"
  }
  step "gpu tests" $tests_limit "$PY" -m pytest -q -p no:cacheprovider -m gpu --gpu-device $device -rfEs \
    --junitxml="$out/gpu_check_tests.xml" $GPU_TESTS
  # epoch first: its 240-epoch projection is the check's headline, kept whatever a later measurement takes.
  step "benchmark" $bench_limit "$PY" scripts/benchmark.py "${bench_args[@]}" --measure epoch kd_step parity images \
    --out "$out" --name gpu_check
  echo "== summary: ${#failed[@]} step(s) failed${failed:+: ${failed[*]}}; results in $out"
  rm -rf "$KD_ROOT"
  [ ${#failed[@]} -eq 0 ]
}

check 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
