#!/usr/bin/env bash
# The GPU check, as one command on a lent GPU machine (docs/performance.md, "On a GPU").
#
# Here first: `python bench/gpu_kit.py` (the wheels that machine lacks, into .whl/). Then the
# device tool runs `bash bench/gpu_run.sh` with .whl carried; the tables land in $OUT.
# Each benchmark runs under its own time limit, so one that overruns still leaves the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/omni-gpu}
mkdir -p "$out"
bash .whl/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMNI_CACHE_DIR=/tmp/omni-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# The issue's workload and cache (2 resident, 4 held) on the benchmark model: the base model,
# omni-batch (its GPU default mixes adapters in a call) and without mixing, and the two scripts a
# diffusers user writes instead. Then a model of SD3 Medium's size with the worker's default cache
# (4 resident, 16 held: calls may mix four adapters), mixing against not: OMNI_MIX_ADAPTERS's default.
modes=(base omni-batch omni-batch-no-mix diffusers-grouped diffusers-loop)
timeout "${TAX_SMALL_S:-120}" python3 bench/tax.py --models small-sd3 --modes "${modes[@]}" 2>&1 | tee "$out/tax-small.txt"
timeout "${TAX_MEDIUM_S:-330}" python3 bench/tax.py --models medium-sd3 --cache 4 16 \
  --modes base omni-batch omni-batch-no-mix diffusers-loop 2>&1 | tee "$out/tax-medium.txt"
# Whether filling a call with other adapters' jobs pays on this device (OMNI_MIX_ADAPTERS).
timeout "${MIXING_S:-90}" python3 bench/mixing.py --models medium-sd3 --reps 1 2>&1 | tee "$out/mixing.txt"
