#!/usr/bin/env bash
# Megatron-core GPT with SNRAdamW (snr_dist.experiments.megatron_gpt). Needs CUDA GPUs:
# data parallelism is NPROC_PER_NODE / TP.
#
#   TP=1 NPROC_PER_NODE=2 launch/megatron_gpt.sh                      # TP=1 x DP=2, 2 GPUs
#   TP=2 NPROC_PER_NODE=4 launch/megatron_gpt.sh                      # TP=2 x DP=2, 4 GPUs
#   TP=1 NPROC_PER_NODE=2 launch/megatron_gpt.sh --optimizer adam     # Megatron's Adam
#
# Environment: TP (default 1), NPROC_PER_NODE (default 2), CONFIG (default
# configs/megatron/gpt_tiny.yaml), PYTHON (default python). Other arguments go to the script
# (--steps N, --optimizer snr|adam, --save DIR).
set -euo pipefail
PYTHON=${PYTHON:-python}
TP=${TP:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
CONFIG=${CONFIG:-configs/megatron/gpt_tiny.yaml}
positive='^[1-9][0-9]*$'
if [[ ! $TP =~ $positive ]]; then
  echo "TP=$TP: allowed: an int >= 1" >&2
  exit 2
fi
if [[ $NPROC_PER_NODE =~ $positive ]]; then
  if (( NPROC_PER_NODE % TP != 0 )); then
    echo "NPROC_PER_NODE=$NPROC_PER_NODE is not a multiple of TP=$TP" >&2
    exit 2
  fi
elif [[ $NPROC_PER_NODE != gpu && $NPROC_PER_NODE != auto ]]; then
  echo "NPROC_PER_NODE=$NPROC_PER_NODE: allowed: an int >= 1, gpu or auto" >&2
  exit 2
fi
# Megatron's tensor-parallel overlap assumes one CUDA work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  -m snr_dist.experiments.megatron_gpt --config "$CONFIG" --tp "$TP" "$@"
