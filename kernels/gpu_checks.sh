#!/usr/bin/env bash
# GPU checks of the fused attention backends, in one command (run from anywhere):
#
#   bash kernels/gpu_checks.sh [all|tests|attention|train] [--quick]
#
# tests: pytest -m gpu tests (kernels, CLI end to end); attention: kernels/bench_attention.py;
# train: benchmarks/train_step.py (needs megatron-core).  --quick trims the benchmarks
# to L = 8192 / block 32 and MDLM / packed documents (about a third of the time).
# Results go to benchmarks/results/ and, when $OUT is set (device tool), to $OUT too.
# Offline machines: wheels in $WHEELS (default shared/wheels) are installed when
# megatron-core is missing (megatron_core, psutil, nvidia_cudnn_frontend ...).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHAT=all
QUICK=0
for arg in "$@"; do
  case "$arg" in
    all|tests|attention|train) WHAT=$arg ;;
    --quick) QUICK=1 ;;
    *) echo "usage: bash kernels/gpu_checks.sh [all|tests|attention|train] [--quick]" >&2; exit 2 ;;
  esac
done
WHEELS=${WHEELS:-shared/wheels}
if ! python -c "import megatron.core" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
python - <<'PY'
import torch
print(f"torch {torch.__version__} CUDA {torch.version.cuda} cuDNN {torch.backends.cudnn.version()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY

status=0
# results are copied to $OUT after every step: a time limit on the whole script keeps what finished
save() { [ -n "${OUT:-}" ] && cp benchmarks/results/attention.* benchmarks/results/train_step.* "$OUT"/ 2>/dev/null; true; }
step() { echo "=== $*"; "$@"; rc=$?; save; [ $rc -eq 0 ] || { echo "=== FAILED (rc $rc): $*"; status=1; }; }
BENCH=(); TRAIN=()
if [ $QUICK = 1 ]; then
  BENCH=(--seq-lengths 8192 --block-sizes 32 L --docs packed --warmup 2 --iters 5)
  TRAIN=(--block-sizes 32 L --warmup 1 --steps 3)
fi
if [ $WHAT = all ] || [ $WHAT = tests ]; then
  step python -m pytest -m gpu tests -q -p no:cacheprovider -rs
fi
if [ $WHAT = all ] || [ $WHAT = attention ]; then
  step python kernels/bench_attention.py ${BENCH[@]+"${BENCH[@]}"}
fi
if [ $WHAT = all ] || [ $WHAT = train ]; then
  if python -c "import megatron.core" 2>/dev/null; then
    step python benchmarks/train_step.py ${TRAIN[@]+"${TRAIN[@]}"}
  else
    echo "=== SKIPPED train_step: megatron-core is not installed (put its wheel in $WHEELS)"; status=1
  fi
fi
exit $status
