#!/usr/bin/env bash
# The GPU job, end to end: CUDA-vs-CPU correctness tests, the curvature and update-time benchmarks on the GPU,
# then sampling throughput against the number of worker processes / Ray workers on the machine's 16 cores.
#
#   bash benchmarks/gpu_job.sh prepare    # here (internet to PyPI): wheels for Python 3.12 (git-ignored folders)
#   bash benchmarks/gpu_job.sh run        # on the GPU machine (no internet), from the repository root
#   bash benchmarks/gpu_job.sh ray-sweep  # there too, right after `run` (the machine must still be warm)
#
# The GPU machine has Python 3.12 with torch + CUDA, numpy, pytest, matplotlib, tensorboard, tqdm; what natpg needs
# beyond that travels as wheels: gymnasium and MuJoCo in .whl/ (≈ 27 MB). Ray's wheel (≈ 79 MB) is over what
# one call may carry (64 MiB with the tree), so `prepare` cuts it in three parts, .whl-ray-1/2/3, that travel in
# two calls and are joined there (ignored paths stay on a warm machine between calls). With the device tool,
# the second call within idle_release_s of the first:
#   run(command="bash benchmarks/gpu_job.sh run", carry=[".whl", ".whl-ray-1"], timeout_s=600)
#   run(command="bash benchmarks/gpu_job.sh ray-sweep", carry=[".whl-ray-2", ".whl-ray-3"], timeout_s=200)
# A session has 15 minutes of device time, the machine's start (1–2 min) included. The steps of `run` are in order
# of what the open issues need first and their timeouts add up to 510 s: with the start, about 11 minutes. The Ray
# sweep (150 s) comes last and only where `status` still shows 4 minutes. Results land in $OUT (or ./gpu-results),
# at most 8 files a call: versions.txt, nvidia-smi.txt, test_cuda.log, fvp_throughput.md, bench_curvature.md,
# update_time.md, sampling_processes.jsonl; sampling_ray.jsonl from the second call.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=("gymnasium==1.4.0" "farama-notifications==0.0.6" "mujoco==4.0.0" "mujoco-core==4.0.0" "mujoco-studio==4.0.0"
        "glfw==2.11.0" "pyopengl==3.1.10" "websockets==17.4"
        # Ray's own needs that the GPU image lacks (click, filelock, msgpack, protobuf, pyyaml, requests it has)
        "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" "rpds-py==2026.9.1")
RAY="ray==2.60.0"

# Weak scaling, as "≥ 0.8·N× one worker" reads: each worker steps 8 copies, so N workers step 8N.
sweep() {  # sweep SAMPLER [--no-local]: one JSON line per worker count (after the local baseline)
    python3 -m natpg.distributed.bench HalfCheetah-v5 --samplers "$@" --workers 1 2 4 8 16 --envs-per-worker 8 \
        --n-steps 256 --iterations 5
}

download() {
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}

install_wheels() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"
    export PYTHONPATH="/tmp/site:$PWD/src"
}

case "${1:-run}" in
prepare)
    rm -rf .whl && download .whl "${WHEELS[@]}"  # one version of each: two stop the install there
    rm -rf .whl-ray .whl-ray-[123] && download .whl-ray "$RAY"
    for i in 1 2 3; do mkdir -p ".whl-ray-$i"; done
    whl=$(basename .whl-ray/ray-*.whl)
    split -n 3 -d -a 1 ".whl-ray/$whl" .whl-ray/part-   # part-0, part-1, part-2
    for i in 0 1 2; do mv ".whl-ray/part-$i" ".whl-ray-$((i + 1))/$whl.part-$i"; done
    rm -rf .whl-ray
    du -sh .whl .whl-ray-[123]
    ;;
run)
    out="${OUT:-gpu-results}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    install_wheels .whl/*.whl
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    python3 -c "import torch, gymnasium, natpg; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$out/versions.txt"
    set +e
    nproc >> "$out/versions.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    timeout 60 python3 benchmarks/fvp_throughput.py --device cuda --repeats 3 2>&1 | tee "$out/fvp_throughput.md"
    timeout 120 python3 benchmarks/bench_curvature.py --device cuda --max-work 1e13 --repeats 3 \
        2>&1 | tee "$out/bench_curvature.md"
    timeout 90 python3 benchmarks/update_time.py --devices cuda cpu --threads 16 --max-work 2e11 --repeats 2 \
        2>&1 | tee "$out/update_time.md"
    export -f sweep
    timeout 90 bash -c "sweep processes" 2>&1 | tee "$out/sampling_processes.jsonl"
    ;;
ray-sweep)
    out="${OUT:-gpu-results}"
    mkdir -p "$out" /tmp/ray-whl
    whl=$(basename .whl-ray-3/*.part-2 .part-2)
    cat .whl-ray-1/"$whl".part-0 .whl-ray-2/"$whl".part-1 .whl-ray-3/"$whl".part-2 > "/tmp/ray-whl/$whl"
    install_wheels .whl/*.whl "/tmp/ray-whl/$whl"
    export -f sweep
    timeout 150 bash -c "sweep ray --no-local" 2>&1 | tee "$out/sampling_ray.jsonl"
    ;;
*)
    echo "usage: bash benchmarks/gpu_job.sh prepare|run|ray-sweep" >&2
    exit 2
    ;;
esac
