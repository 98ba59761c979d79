#!/usr/bin/env bash
# The checks that need a GPU, prepared to run on a GPU machine that has PyTorch
# with CUDA but not this project's other packages and no network (as the GPU machines
# lent to this project's developers; docs/architecture.md §10).
#
#   bash tests/benchmarks/gpu_checks.sh fetch   # with network: the wheels the GPU image
#                                               # lacks (jsonschema and its parts, nibabel,
#                                               # MONAI: 5 MB) into .whl/ (git-ignored)
#   bash tests/benchmarks/gpu_checks.sh run [tests|benchmarks]
#                                               # on the GPU machine, with .whl/ beside:
#                                               # tests/test_cuda.py, then the GPU
#                                               # benchmarks (both when no part is named)
#
# `run` writes each part's output to $OUT (default gpu_checks/) and goes on after a part
# that fails or runs past its time limit (seconds, below); nothing here asserts a speed.
# On the H200 the tests take about 300 s (the torchrun resume test alone 109 s: three
# fresh processes) and the benchmarks about 290 s, so the two parts go in two commands of
# at most 10 minutes each (limits 330 and 360 s); the exit status is that of the tests.
set -uo pipefail

PYTHON=${PYTHON:-python3}
WHEELS=.whl
# The Python version and platforms of the GPU image's interpreter (CPython 3.12).
WHEEL_TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# the versions of envs/train.yaml; attrs, NumPy and PyTorch are in the image
MISSING_PACKAGES=(jsonschema==4.26.0 jsonschema-specifications referencing rpds-py nibabel==5.4.2
                  monai==1.6.1)

case "${1:-}" in
fetch)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${WHEEL_TARGET[@]}" \
        -d "$WHEELS" "${MISSING_PACKAGES[@]}" || exit
    ls -l "$WHEELS"
    ;;
run)
    part=${2:-all}
    case "$part" in all|tests|benchmarks) ;; *) echo "no part '$part': tests or benchmarks" >&2; exit 2;; esac
    out=${OUT:-gpu_checks}
    mkdir -p "$out"
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/brainage-site "$WHEELS"/*.whl || exit
        export PYTHONPATH=/tmp/brainage-site
    fi
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}workflow:tests PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    } 2>&1 | tee "$out/machine.txt"

    tests_status=0
    if [[ $part != benchmarks ]]; then
        # one process: the GPU is shared by nothing else, and xdist may be absent there
        timeout 330 "$PYTHON" -m pytest -q -p no:cacheprovider -p no:xdist -o addopts="" \
            --durations=15 tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
        tests_status=${PIPESTATUS[0]}
    fi
    [[ $part == tests ]] && exit "$tests_status"

    timeout 100 "$PYTHON" tests/benchmarks/bench_pretrain.py --device cuda 2>&1 \
        | tee "$out/bench_pretrain.log"
    # bf16 (precision auto: the GPU default) against the plain loop, then float32 (the
    # paper config's) alone; 128 subjects: 8 steps per epoch (32 gave 2, 0.05 s, too few
    # to compare precisions on the H200)
    timeout 100 "$PYTHON" tests/benchmarks/bench_train.py --shapes 2mm --device cuda \
        --threads 8 --subjects 128 --cell-epochs 0 2>&1 | tee "$out/bench_train.log"
    timeout 50 "$PYTHON" tests/benchmarks/bench_train.py --shapes 2mm --device cuda \
        --threads 8 --subjects 128 --precision float32 --skip-plain --cell-epochs 0 2>&1 \
        | tee "$out/bench_train_float32.log"
    # each case runs in two fresh processes, about 16 s on the H200 machine (PyTorch's
    # import and CUDA's start): one size fits the limit
    timeout 110 "$PYTHON" tests/benchmarks/bench_losses.py --device cuda \
        --sizes 2048 2>&1 | tee "$out/bench_losses.log"
    exit "$tests_status"
    ;;
*)
    echo "usage: bash tests/benchmarks/gpu_checks.sh fetch|run [tests|benchmarks]" >&2
    exit 2
    ;;
esac
