#!/usr/bin/env bash
# All GPU checks in one command, about 8 minutes on one H100/H200 (run from anywhere):
#
#   bash kernels/gpu_checks.sh [OUTDIR] [--only STEP,STEP...] [--dry-run]
#
# OUTDIR (default $OUT when set, else benchmarks/results/gpu_checks) receives, after EVERY step, so a run
# cut short keeps what finished: summary.md (step, exit code, seconds), gpu_checks.log (all output),
# results.tar.gz (every result file so far) and copies of attention.md / train_step.md.  At most 5 files.
# Every step runs under its own `timeout`; the whole run stays within BUDGET seconds (default 480): a step
# gets min(its limit, what is left) and is skipped when under 20 s are left.  Steps, in priority order:
#
#   env                 torch / CUDA / GPU / package versions
#   install             wheels/*.whl -> /tmp/llada-site (no network there), only if megatron-core is missing
#   gpu-tests           pytest -m gpu (kernels vs the fp32 reference, closed-form BlockMask, RoPE, CLI end to end)
#   attention           kernels/bench_attention.py, L = 4096 and 8192, B = 32 and MDLM, packed documents:
#                       unfused / flex / cudnn; BlockMask build time per row
#   train-step          benchmarks/train_step.py, flex and cudnn, B = 32 and MDLM, 8 micro-batches per step
#                       (extra flags, e.g. the optimizer / cross-entropy toggles: TRAIN_STEP_ARGS="...")
#   cli                 llada-cpt train (20 steps, flex, NCCL) then llada-cpt generate on that checkpoint
#   attention-16384     L = 16384 (2L = 32768): flex and cudnn; then flex fwd+bwd of each of 8 simulated
#                       CP ranks' local queries (issue 21's per-rank CP timing; split = training's split)
#   mask-baseline       torch's compiled create_block_mask vs the closed form, L = 4096 (same process)
#   autotune            flex compiled with max-autotune-no-cudagraphs, 128x128 and 128x64 tiles, L = 8192,
#                       B = 32 (slow compile; last)
#
# Wheels (the GPU machines have no network; torch, triton, numpy, psutil are in their image).  Here, from the
# repository root, for the image's Python 3.12:
#
#   pip download --no-deps --python-version 3.12 --only-binary=:all: --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d wheels megatron-core==0.16.1
#
# plus the wheel of any optional kernel package the run should measure (e.g. the fused cross-entropy library,
# pinned in constraints/ci.txt).  wheels/ is git-ignored: name it in the device tool's `carry`.
# FlashAttention-4 (LLADA_FLEX_KERNEL_BACKEND=FLASH) is NOT carried: nvidia-cutlass-dsl-libs-cu13 alone is
# 92 MB (cu12: 92 MB), over the 64 MiB a run can carry; the autotune / FLASH rows report it as unavailable.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=""
ONLY=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=",$2,"; shift ;;
    --only=*) ONLY=",${1#--only=},";;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "usage: bash kernels/gpu_checks.sh [OUTDIR] [--only STEP,STEP...] [--dry-run]" >&2; exit 2 ;;
    *) OUTDIR=$1 ;;
  esac
  shift
done
OUTDIR=${OUTDIR:-${OUT:-$ROOT/benchmarks/results/gpu_checks}}
BUDGET=${BUDGET:-480}
SCRATCH=$(mktemp -d /tmp/gpu_checks.XXXXXX)
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_checks.log
SUMMARY=$OUTDIR/summary.md
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image has python3 (with torch), maybe no `python`
export PY
START=$SECONDS
status=0
[ $DRY = 1 ] || { : >"$LOG"; printf '| step | exit | seconds | limit |\n|---|---|---|---|\n' >"$SUMMARY"; }

# copy every result so far into OUTDIR (called after every step: a killed run keeps what finished)
collect() {
  [ $DRY = 1 ] && return 0
  for f in attention/attention.md train_step/train_step.md; do
    [ -f "$SCRATCH/$f" ] && cp "$SCRATCH/$f" "$OUTDIR/"
  done
  tar -czf "$OUTDIR/results.tar.gz.tmp" --exclude=./cli -C "$SCRATCH" . 2>/dev/null \
    && mv "$OUTDIR/results.tar.gz.tmp" "$OUTDIR/results.tar.gz"
  true
}

# step NAME LIMIT_S COMMAND...: run under `timeout` (never past the budget), log, record, collect
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return 0; fi
  local left=$((BUDGET - (SECONDS - START) - 5))
  [ $limit -gt $left ] && limit=$left
  if [ $DRY = 1 ]; then echo "STEP $name timeout $limit: $*"; return 0; fi
  if [ $limit -lt 20 ]; then
    echo "=== SKIPPED $name: ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    echo "| $name | skipped (budget) | 0 | $2 |" >>"$SUMMARY"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  # shell functions (exported below) run through a child bash: `timeout` only runs programs
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' _ "$@"; fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "=== TIMEOUT $name after ${limit}s" | tee -a "$LOG"
  [ $rc -eq 0 ] || status=1
  echo "| $name | $rc | $((SECONDS - t0)) | $limit |" >>"$SUMMARY"
  collect
}

install_wheels() {
  "$PY" -c "import megatron.core" 2>/dev/null && { echo "megatron-core already importable"; return 0; }
  ls wheels/*.whl >/dev/null 2>&1 || { echo "no wheels/*.whl and no megatron-core: train steps will fail"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/llada-site wheels/*.whl
}
export PYTHONPATH="$PYTHONPATH:/tmp/llada-site"  # install_wheels runs in a child: the path is set up front

export SCRATCH
export -f install_wheels

BENCH=("$PY" kernels/bench_attention.py --docs packed --warmup 2 --iters 5)
TRAIN=("$PY" benchmarks/train_step.py --micro-batches 8 --warmup 1 --steps 3)
read -r -a TRAIN_EXTRA <<<"${TRAIN_STEP_ARGS:-}"

step env 30 "$PY" - <<'PY'
import importlib.metadata as md, torch
print(f"torch {torch.__version__} CUDA {torch.version.cuda} cuDNN {torch.backends.cudnn.version()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for p in ("triton", "megatron-core", "transformer-engine", "flash-attn-4", "nvidia-cutlass-dsl"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "-")
PY
step install 60 install_wheels
# only the files that hold GPU tests: a CPU-only test module importing a package the image lacks must not
# stop the collection
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
step gpu-tests 110 "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -q -p no:cacheprovider -rs --continue-on-collection-errors
step attention 130 "${BENCH[@]}" --seq-lengths 4096 8192 --block-sizes 32 L --backends unfused flex cudnn \
  --out "$SCRATCH/attention"
step train-step 130 "${TRAIN[@]}" --block-sizes 32 L --backends flex cudnn ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} --out "$SCRATCH/train_step"
cli_train_generate() {  # the GPU crash fixed last time (generation) was never rerun
  "$PY" -m llada_cpt.cli train -c configs/tiny_cpu.yaml --nproc 1 "diffusion.block_schedule=[[1,3],[4,100]]" \
    train.lr_warmup_steps=2 train.train_steps=20 checkpoint.save_interval=20 model.attention_backend=flex \
    "checkpoint.save_dir=$SCRATCH/cli/run" || return $?
  "$PY" -m llada_cpt.cli generate --ckpt "$SCRATCH/cli/run" --prompt "def f(x):" --block-size 4 --max-new-tokens 32
}
export -f cli_train_generate
step cli 90 cli_train_generate
step attention-16384 120 "${BENCH[@]}" --seq-lengths 16384 --block-sizes 32 --backends flex cudnn --cp-size 8 \
  --out "$SCRATCH/attention_16384"
step mask-baseline 60 "${BENCH[@]}" --seq-lengths 4096 --block-sizes 32 --backends flex \
  --flex-variants create_block_mask --out "$SCRATCH/mask_baseline"
# 128x64 tiles need max-autotune on an H100: torch's one default backward config there (BLOCK_N1 = 128)
# does not divide a 64-key tile, so without autotuning the backward has no kernel
step autotune 150 "${BENCH[@]}" --seq-lengths 8192 --block-sizes 32 --backends flex \
  --flex-variants max-autotune 128x64+max-autotune --out "$SCRATCH/autotune"

[ $DRY = 1 ] && { rm -rf "$SCRATCH"; exit 0; }
collect
echo "=== summary ($((SECONDS - START)) s of ${BUDGET} s; results in $OUTDIR)"
cat "$SUMMARY"
rm -rf "$SCRATCH"
exit $status
