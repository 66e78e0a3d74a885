#!/usr/bin/env bash
# Installs everything fastmlp's tests and examples need on a fresh Debian
# machine: the Fashion-MNIST package, LLVM's tools (llvm-mca) and fastmlp
# itself with its test extra, then compiles the kernels into Numba's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
# llvm-mca: tests/test_microkernel.py simulates the kernels on other CPUs
compgen -c llvm-mca >/dev/null || packages+=(llvm)
if [ ${#packages[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}"
fi
python -m pip install --quiet -e ".[test]"
# PyTorch, for the tests that load fastmlp's safetensors files into an
# nn.Sequential and import one (this spelling takes a CPU build)
python -m pip install --quiet torch==2.13.0
# compile the kernels for this CPU now (45-50 s a dtype on 2 cores), so that
# the first fastmlp-train (float32) and the first estimator fit on float64
# data (scikit-learn's usual input) start at once
fastmlp-train --compile-only
fastmlp-train --compile-only --dtype float64
