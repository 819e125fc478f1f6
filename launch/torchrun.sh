#!/usr/bin/env bash
# Launch a llada-cpt stage on one node or many (torchrun options, llada-cpt launcher semantics).
#
#   launch/torchrun.sh <train|sft|dpo|rl> -c CONFIG.yaml [section.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES          number of nodes (default 1); > 1 uses c10d rendezvous at MASTER_ADDR:MASTER_PORT
#   NODE_RANK       this node's rank (only a hint: c10d rendezvous assigns ranks itself)
#   MASTER_ADDR     rendezvous host (required with NNODES > 1), MASTER_PORT (default 29500)
#   RDZV_ID         rendezvous id shared by all nodes of one job (default: llada-cpt)
#   PYTHON          interpreter (default: python)
#
# It runs `python -m llada_cpt.runtime.launch`, which takes torchrun's options and adds: exit code 3
# when the ranks saved a checkpoint on a stop request (requeue), 2 with one error line for a user
# error, and SIGTERM / SIGUSR1 turned into a stop request (checkpoint, then exit) instead of being
# forwarded to ranks that may have had it already; a second signal stops at once.
set -euo pipefail
STAGE=${1:?usage: launch/torchrun.sh <train|sft|dpo|rl> -c CONFIG.yaml [overrides]}
shift
PY=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" -gt 1 ]; then
  RDZV=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-id="${RDZV_ID:-llada-cpt}"
        --rdzv-endpoint="${MASTER_ADDR:?MASTER_ADDR is required with NNODES > 1}:${MASTER_PORT:-29500}")
  if [ -n "${NODE_RANK:-}" ]; then RDZV+=(--node-rank="$NODE_RANK"); fi
else
  RDZV=(--standalone --nnodes=1)
fi
exec "$PY" -m llada_cpt.runtime.launch "${RDZV[@]}" --nproc-per-node="$NPROC_PER_NODE" \
  -m llada_cpt.cli "$STAGE" "$@"
