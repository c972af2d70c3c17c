#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see docs/performance.md, "CUDA").
# Installs qcore and its plugins without dependencies into /tmp/site (the machine's own torch and
# transformers are used; wheels for anything missing travel in .whl/), runs tests/test_cuda.py
# and the CUDA kernel timing, and writes logs to $OUT (or ./logs).
set -u
OUT=${OUT:-logs}
mkdir -p "$OUT" /tmp/site
py=python3
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
$py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site \
  . plugins/qcore_gptq plugins/qcore_awq plugins/qcore_hqq plugins/qcore_smoothquant 2>&1 | tail -3
export PYTHONPATH=/tmp/site QCORE_PROGRESS=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$py -c "import torch, transformers, qcore; print(torch.__version__, transformers.__version__, qcore.list_methods())" | tee -a "$OUT/gpu.txt"
cd /tmp && $py -m pytest -q -rA -p no:cacheprovider --import-mode=importlib -o addopts="" \
  "$OLDPWD/tests/test_cuda.py" 2>&1 | tee "$OUT/test_cuda.txt" | tail -40
cd "$OLDPWD"
timeout 120 $py bench/kernels_cuda.py 2>&1 | tee "$OUT/kernels_cuda.txt"
