# snr-dist on the official PyTorch CUDA runtime image, with the DeepSpeed and Triton extras.
# torchrun is the entrypoint; the default command trains the quickstart on every local GPU.
#
#   docker build -t snr-dist .
#   docker run --gpus all --ipc=host snr-dist                      # one node, all GPUs
#
# Multi-node: run one container per node on the host network, same arguments everywhere;
# torchrun's c10d rendezvous on MASTER_ADDR gathers them (see docs/distributed.md):
#
#   docker run --gpus all --ipc=host --network=host snr-dist \
#     --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \
#     --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=my-job --max-restarts=2 \
#     -m snr_dist.cli train --config configs/quickstart.yaml --set train.checkpoint_every=5
#
# Mount a shared directory at /opt/snr-dist/runs so checkpoints survive restarts.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

WORKDIR /opt/snr-dist
# The sources build the package in a folder of their own, removed afterwards: a snr_dist/ source
# tree in the working directory would shadow the installed package (`python -m` puts the working
# directory first on sys.path), and the source tree lacks snr_dist.triton_kernels, which the
# wheel maps from kernels/, so CUDA runs would silently take the torch path.
COPY pyproject.toml README.md LICENSE constraints.txt /tmp/snr-dist-src/
COPY snr_dist /tmp/snr-dist-src/snr_dist
COPY kernels /tmp/snr-dist-src/kernels
COPY configs /tmp/snr-dist-src/configs
COPY configs ./configs
COPY launch ./launch

# Keep the image's CUDA build of torch (and the Triton it was built with): pin it so the extras
# cannot replace it; every other package at the version the suite passed with (constraints.txt,
# whose torch is the CPU wheel the tests run on).
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/pins.txt \
 && grep -viE '^(torch|triton|nvidia-)' /tmp/snr-dist-src/constraints.txt >> /tmp/pins.txt \
 && cd /tmp/snr-dist-src \
 && python -m pip install --constraint /tmp/pins.txt ".[deepspeed,triton,examples]" \
 && cd /opt/snr-dist && rm -rf /tmp/snr-dist-src \
 && python -c "import snr_dist, snr_dist.triton_kernels, torch; print('snr-dist', snr_dist.__version__, 'from', snr_dist.__file__, 'torch', torch.__version__)"

ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc_per_node=gpu", "-m", "snr_dist.cli", "train", "--config", "configs/quickstart.yaml"]
