#!/usr/bin/env bash
# Issue 25's GPU checks: the paper preset's cold and warm answer, whole-volume throughput and a training step,
# written to OUTDIR/RESULTS.md (a copy of benchmarks/RESULTS.md with the section replaced) and OUTDIR/gpu_checks.log.
# Usage: bash benchmarks/gpu_checks.sh OUTDIR     (needs wheels in .whl/: see benchmarks/gpu_env.sh)
# Ends within 10 minutes; on a machine without an NVIDIA GPU it says so in one line and exits 0.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_checks: no NVIDIA GPU here (nvidia-smi lists none): nothing measured"
    exit 0
fi
source benchmarks/gpu_env.sh
mkdir -p "$out"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
set -o pipefail
timeout 560 python3 benchmarks/gpu_checks.py --results "$out/RESULTS.md" --budget 450 2>&1 | tee "$out/gpu_checks.log"
