#!/usr/bin/env bash
# Several nodes: run this script once on every node, with the same arguments. torchrun's c10d
# rendezvous (hosted at MASTER_ADDR:MASTER_PORT) gathers NNODES agents and assigns ranks.
#
#   # on every node (MASTER_ADDR: an address of the first node that all nodes can reach)
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       launch/multinode.sh --config configs/quickstart.yaml
#
# Environment:
#   NNODES          number of nodes (required), or MIN:MAX for an elastic job that goes on
#                   with fewer nodes when one is lost and grows back when one joins (with
#                   MAX_RESTARTS >= 1 and train.checkpoint_every: each change of the world
#                   resumes from the last checkpoint, resharded to the ranks there are now)
#   NODE_RANK       this node's rank; optional: the c10d rendezvous assigns node ranks itself
#                   (set it to pin the order, e.g. under a static scheduler)
#   MASTER_ADDR     rendezvous host (default 127.0.0.1)
#   MASTER_PORT     rendezvous port (default 29500)
#   NPROC_PER_NODE  processes per node (default: the number of GPUs, else 1)
#   RDZV_ID         job id shared by the nodes (default snr-dist)
#   MAX_RESTARTS    elastic restarts before giving up (default 0); with
#                   train.checkpoint_every > 0 a restarted job resumes from its last checkpoint
#   RDZV_CONF       torchrun's --rdzv-conf (optional), e.g. last_call_timeout=5: how long a
#                   rendezvous with at least MIN nodes waits for more
#   PYTHON          interpreter (default python)
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
PYTHON=${PYTHON:-python}
# Restarted workers must not share the rendezvous TCPStore with the previous attempt: they can
# read its stale addresses and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
node_rank=()
if [ -n "${NODE_RANK:-}" ]; then node_rank=(--node-rank="$NODE_RANK"); fi
rdzv_conf=()
if [ -n "${RDZV_CONF:-}" ]; then rdzv_conf=(--rdzv-conf="$RDZV_CONF"); fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" "${node_rank[@]}" "${rdzv_conf[@]}" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-snr-dist}" --max-restarts="${MAX_RESTARTS:-0}" \
  -m snr_dist.cli train "$@"
