#!/usr/bin/env bash
# Install dflash-ray with its test/benchmark extras (and Triton, whose kernels the tests run
# interpreted on CPU) into the current Python.
# torch is pinned first so pip takes the local CPU wheel instead of pulling a CUDA build;
# z-lab's `dflash` (the reference we test against) goes in with --no-deps: its exact pins
# (transformers 5.15, datasets, requests) fight ours and none of them is needed for its model code.
# flash-linear-attention's kernels (the `gpu` extra's Gated DeltaNet path) go in without the rest
# of that extra (cupy is a CUDA wheel): the tests run fla's recurrent kernel interpreted on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[dev,kernels]'
$PY -m pip install -q --no-deps dflash==0.1.0
$PY -m pip install -q --no-deps fla-core==0.6.0 einops==0.8.2
