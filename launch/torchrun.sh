#!/usr/bin/env bash
# Launch a llada-cpt stage with torchrun, on one node or many.
#
#   launch/torchrun.sh <train|sft|dpo|rl> -c CONFIG.yaml [section.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 2 on a CPU-only machine)
#   NNODES          number of nodes (default 1); > 1 uses c10d rendezvous at MASTER_ADDR:MASTER_PORT
#   NODE_RANK       this node's rank (default 0; with c10d rendezvous it is assigned automatically)
#   MASTER_ADDR     rendezvous host (default localhost), MASTER_PORT (default 29500)
#   RDZV_ID         rendezvous id shared by all nodes of one job (default: llada-cpt)
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
  [ -n "${NODE_RANK:-}" ] && RDZV+=(--node-rank="$NODE_RANK")
else
  RDZV=(--standalone --nnodes=1)
fi
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NPROC_PER_NODE" \
  -m llada_cpt.cli "$STAGE" "$@"
