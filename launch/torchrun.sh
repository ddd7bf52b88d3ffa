#!/usr/bin/env bash
# One node: `snr-dist train` on NPROC_PER_NODE processes (DDP or FSDP2, per the config's
# `distributed.strategy`). Arguments are passed to `snr-dist train`.
#
#   NPROC_PER_NODE=2 launch/torchrun.sh --config configs/quickstart.yaml
#   MAX_RESTARTS=3 launch/torchrun.sh --config configs/quickstart.yaml \
#       --set train.checkpoint_every=5      # restarted workers resume from the last checkpoint
#
# Environment: NPROC_PER_NODE (default: the number of GPUs, else 2), MAX_RESTARTS (default 0),
# PYTHON (default: python).
set -euo pipefail
PYTHON=${PYTHON:-python}
# Restarted workers must not share the rendezvous TCPStore with the previous attempt: they can
# read its stale addresses and fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec "$PYTHON" -m torch.distributed.run --standalone \
  --nproc_per_node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-0}" \
  -m snr_dist.cli train "$@"
