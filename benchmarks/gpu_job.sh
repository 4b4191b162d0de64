#!/usr/bin/env bash
# The GPU job, end to end: CUDA-vs-CPU correctness tests, then the curvature and update-time benchmarks on the GPU.
#
#   bash benchmarks/gpu_job.sh prepare   # here (internet to PyPI): wheels for Python 3.12 into .whl/ (git-ignored)
#   bash benchmarks/gpu_job.sh run       # on the GPU machine (no internet), from the repository root
#
# The GPU machine has Python 3.12 with torch + CUDA, numpy, pytest, matplotlib, tensorboard, tqdm; what natpg needs
# beyond that (gymnasium and its one dependency) travels as wheels. With the device tool:
#   run(command="bash benchmarks/gpu_job.sh run", carry=[".whl"], timeout_s=600)
# Results land in $OUT (or ./gpu-results): test log, bench_curvature.md, update_time.md, nvidia-smi.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=("gymnasium==1.4.0" "farama-notifications==0.0.6")

case "${1:-run}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
run)
    out="${OUT:-gpu-results}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src"
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    python3 -c "import torch, gymnasium, natpg; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/versions.txt"
    set +e
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    timeout 240 python3 benchmarks/bench_curvature.py --device cuda --max-work 1e13 --repeats 3 \
        2>&1 | tee "$out/bench_curvature.md"
    timeout 150 python3 benchmarks/update_time.py --devices cuda cpu --threads 16 --max-work 2e11 --repeats 2 \
        2>&1 | tee "$out/update_time.md"
    ;;
*)
    echo "usage: bash benchmarks/gpu_job.sh prepare|run" >&2
    exit 2
    ;;
esac
