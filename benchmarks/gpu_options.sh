#!/usr/bin/env bash
# Issue 10's options table on a GPU machine that lacks our pinned packages (wheels in .whl/, see
# benchmarks/gpu_env.sh): two variant subsets in parallel on one GPU, then one merged table.
# Usage: bash benchmarks/gpu_options.sh OUTDIR [STEPS]
set -u
out=${1:?output folder}; steps=${2:-300}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_options: no NVIDIA GPU here (nvidia-smi lists none): nothing measured"
    exit 0
fi
source benchmarks/gpu_env.sh
export OMP_NUM_THREADS=4
cp benchmarks/RESULTS.md "$out/RESULTS.md"
common=(--model MONAILabelApp/model/raddiagseg-demo --steps "$steps" --num-workers 6 --samples 80 --tts 4x4 --title H200 --results -)
timeout 480 python3 benchmarks/options.py "${common[@]}" --work /tmp/oa --variants plain,tts,ft > "$out/options_a.log" 2>&1 &
a=$!
timeout 480 python3 benchmarks/options.py "${common[@]}" --work /tmp/ob --variants rvls2m,cot > "$out/options_b.log" 2>&1 &
b=$!
wait $a; wait $b
tail -3 "$out/options_a.log" "$out/options_b.log"
python3 benchmarks/options.py "${common[@]:0:8}" --title H200 --work /tmp/oa --results "$out/RESULTS.md" \
    --merge /tmp/oa/options.json /tmp/ob/options.json 2>&1 | tail -30
cp /tmp/oa/options.json "$out/options_a.json"; cp /tmp/ob/options.json "$out/options_b.json"
