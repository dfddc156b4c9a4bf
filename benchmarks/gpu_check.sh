#!/usr/bin/env bash
# hdb-jax on this accelerator in one run of a few minutes (benchmarks/gpu_check.py):
# attention kernels and their parity at SD1.5 shapes, the bf16 fast-finetuning step time
# and peak memory, a personalization end to end; random weights, nothing downloaded.
#
#   pip install -e '.[cuda]' && bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry     # CPU, tiny shapes (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
