#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one run that fits a short GPU lease (about 8 minutes
# on an H100/H200): the GPU tests (no host sync in the step, parity with the torch path, the
# device-side NaN skip, Megatron if it imports), the Triton kernel benchmark against the HBM
# floor, and the optimizer-step benchmark on the GPU. Results go to $OUT (default gpu-results/).
#
#   bash launch/gpu_checks.sh
#
# On a machine whose Python has torch and Triton but not this package's other dependencies,
# bring them as wheels first (from a machine with a package index; Python 3.12 shown):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types \
#     typing-inspection
# The script installs .whl/*.whl, and this repository, into a private target folder.
set -u -o pipefail  # a failing check fails the script, not only tee
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SNR_GPU_SITE:-/tmp/snr-gpu-site}
if ! $PY -c "import snr_dist.triton_kernels" 2>/dev/null; then
    mkdir -p "$SITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 1
    fi
    # the package itself (kernels/ installs as snr_dist.triton_kernels), without touching torch
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
$PY - <<'PY' 2>&1 | tee "$OUT/device.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY
status=0
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu_step.py tests/test_megatron_gpu.py \
    2>&1 | tee "$OUT/pytest.txt" || status=1
timeout 150 $PY kernels/bench.py --out "$OUT/kernels-bench.md" 2>&1 | tee "$OUT/kernels-bench.txt" \
    || status=1
timeout 150 $PY benchmarks/step_floor.py --device cuda --rounds 30 --full-rounds 10 \
    --json "$OUT/step_floor.json" 2>&1 | tee "$OUT/step_floor.txt" || status=1
exit $status
