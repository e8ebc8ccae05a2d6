#!/usr/bin/env bash
# The cost of --retain_kl on the demo's recipe: sft with the base answers trained by cross-entropy
# (recipe K, the demo's) and by KL to the base model (recipe R: one more forward without gradient
# of the batches that hold base answers), same data and seed, STEPS steps each; prints the time of
# steps 2..STEPS from logging.jsonl (model load and the first step left out).
# Figures: bench/RESULTS.md, "Retention, session 6". Run under /work/wt/quiet for a timing.
# Usage: bench/retain_kl_speed.sh [OUT] [STEPS]   (default /tmp/retain_kl_speed, 24)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/retain_kl_speed}
STEPS=${2:-24}
B=bench/data/recipe_b_base_answers.jsonl
echo "cpu: $(grep -m1 -o 'avx512_bf16' /proc/cpuinfo || echo 'no avx512_bf16'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in ce kl; do
  extra=()
  [ "$mode" = kl ] && extra=(--retain_dataset "$B" --retain_kl 4 --retain_ce 0)
  rm -rf "$OUT/$mode"
  PYTHONPATH=src ${PYTHON:-python} -m tunesmith sft --model demo --model_name 小智 XiaoZhi \
    --model_author 星河 Xinghe --system 'You are a helpful assistant.' --packing true \
    --max_length 256 --num_train_epochs 2 --learning_rate 5e-4 --warmup_ratio 0.1 \
    --lora_dropout 0 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --logging_steps 1 --report_to none --dataset 'self-cognition#80' "$B" --seed 1 \
    --max_steps "$STEPS" "${extra[@]}" --output_dir "$OUT/$mode" > "$OUT.$mode.log" 2>&1
  ${PYTHON:-python} - "$OUT/$mode" "$mode" <<'PY'
import glob, json, sys
log = [json.loads(x) for x in open(glob.glob(f"{sys.argv[1]}/v*/logging.jsonl")[0])]
span = log[-1]["elapsed_s"] - log[0]["elapsed_s"]
print(f"{sys.argv[2]}: steps 2..{log[-1]['step']} in {span:.1f} s ({span / (len(log) - 1):.2f} s a step)")
PY
done
