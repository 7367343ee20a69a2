#!/usr/bin/env bash
# The GPU check, as one script for a machine with one CUDA GPU (and no network):
# the CUDA/NCCL tests, then the CUDA restore benchmark warm and cold, and the CPU benchmarks
# that a 2-core machine cannot run fairly (8 ranks on one node; resharding). Output goes to
# stdout and, when $OUT is set, to $OUT/gpu_check.log. Wheels in .whl/ (e.g. isal) are
# installed into /tmp/site first if present.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p .benchtmp && export BENCH_DIR=$PWD/.benchtmp TMPDIR=$PWD/.benchtmp
step() { local t=$1; shift; echo; echo "=== $* (limit ${t}s) $(date +%T)"; timeout -k 5 "$t" "$@"; echo "=== rc $?"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, isal, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'isal', isal.__version__)"
nproc; df -h . /tmp | tail -2; grep -E ' / | /tmp ' /proc/mounts
step 150 python3 -m pytest tests_gpu -q -x -p no:cacheprovider
step 90 python3 benchmarks/bench_cuda.py --repeats 3
step 90 python3 benchmarks/bench_cold_ranks.py --ranks 8 --repeats 3
step 90 python3 benchmarks/bench_cuda.py --repeats 3 --cold
step 120 python3 benchmarks/bench_reshard.py --repeats 3 --markdown
rm -rf .benchtmp
