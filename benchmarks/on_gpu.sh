#!/usr/bin/env bash
# Every GPU check and figure, in one run on a machine with a CUDA GPU and vidsynth installed with its dev extra:
# the CUDA paths' tests, then vidsynth against diffusers at the default video (ms-1.7b configuration, random
# weights, float16) as it runs by default and with --compile, the compiled one twice (the second process finds the
# first one's kernels in inductor's cache, and decodes all 16 frames at once, as diffusers does, rather than 8 at a
# time), then how long writing the file takes on that host's CPU (part of the time end to end). About seven minutes
# on an H200 host. Writes everything under OUT.
#
#     bash benchmarks/on_gpu.sh [OUT]          # default OUT: gpu-results
set -euo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$out/torch-compile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$out/tests.txt" || true  # the figures are wanted either way
side_by_side() {
    python benchmarks/versus_diffusers.py --device cuda --dtype float16 --runs 3 --json "$out/$1.json" "${@:2}" \
        2>&1 | tee "$out/$1.md"
}
side_by_side default
side_by_side compiled --compile
side_by_side compiled-again --compile --decode-chunk 16
python benchmarks/writing.py --runs 5 2>&1 | tee "$out/writing.md"
