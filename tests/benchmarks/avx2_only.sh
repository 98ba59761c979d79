#!/usr/bin/env bash
# Run a command with the AVX2 code paths of its numerical libraries on an AVX-512 CPU, to
# tell how much of a time difference between machines is the instruction set:
#
#   tests/benchmarks/avx2_only.sh .venv/bin/snakemake --cores 2
#   python tests/benchmarks/summarise_run.py
#
# Caps: PyTorch's ATen kernels and oneDNN (3D convolutions), MKL, OpenBLAS (NumPy, SciPy,
# scikit-learn), NumPy's own dispatch, numba's JIT target (UMAP). Not capped: ANTs/ITK
# (compiled for a fixed baseline, no runtime dispatch). It does not emulate a slower clock,
# fewer memory channels or a smaller cache, so an AVX2-only machine can still be slower.
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
export ATEN_CPU_CAPABILITY=avx2
export ONEDNN_MAX_CPU_ISA=AVX2
export MKL_ENABLE_INSTRUCTIONS=AVX2
export OPENBLAS_CORETYPE=Haswell
export NUMBA_CPU_NAME=haswell
export NPY_DISABLE_CPU_FEATURES="AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"
exec "$@"
