#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see docs/performance.md, "CUDA").
# Installs qcore and its plugins without dependencies into /tmp/site (the machine's own torch and
# transformers are used; wheels for anything missing travel in .whl/), runs tests/test_cuda.py
# and the CUDA kernel timing, then -- that machine's CPU being another x86-64 -- qcore's own CPU
# kernel's tests and bench/kernels.py there, and writes logs to $OUT (or ./logs).
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
lscpu | grep -E "^(Model name|CPU\(s\)|L3)" | tee "$OUT/cpu.txt"
grep -o -w -E "avx512_bf16|avx512bw|amx_bf16" /proc/cpuinfo | sort -u | tr '\n' ' ' | tee -a "$OUT/cpu.txt"; echo
cd /tmp && $py -m pytest -q -rs -p no:cacheprovider --import-mode=importlib -o addopts="" \
  "$OLDPWD/tests/test_native.py" "$OLDPWD/tests/test_quant_linear.py" 2>&1 | tee "$OUT/test_native_cpu.txt" | tail -8
cd "$OLDPWD"
OMP_NUM_THREADS=${CPU_THREADS:-8} timeout 200 $py bench/kernels.py --rounds 5 --threads "${CPU_THREADS:-8}" 2>&1 \
  | tee "$OUT/kernels_cpu.txt" | tail -9
