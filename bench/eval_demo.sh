#!/usr/bin/env bash
# tunesmith eval on the README demo's run, on llama.cpp and on PyTorch: the demo's sft recipe
# (scripts/demo.sh), then cold and warm evals. Figures: bench/RESULTS.md, "tunesmith eval on
# llama.cpp and the retention recipe". Each timed command runs under QUIET (e.g. /work/wt/quiet)
# when set, so that the machine is the command's alone.
# Usage: bench/eval_demo.sh [OUTPUT_DIR]   (default output/demo; needs the demo model wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output/demo}
TS=${TUNESMITH:-tunesmith}
Q=${QUIET:-}
flags() { echo "cpu: $(grep -m1 -o 'avx512_bf16\|avx512f' /proc/cpuinfo | sort -u | tr '\n' ' ')"; }
flags
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
$Q /usr/bin/time -f "sft wall %e s, user %U s" $TS sft --model demo \
    --dataset 'self-cognition#80' base-answers \
    --model_name 小智 XiaoZhi --model_author 星河 Xinghe --system 'You are a helpful assistant.' \
    --packing true --max_length 256 --num_train_epochs 2 --learning_rate 5e-4 --warmup_ratio 0.1 \
    --lora_dropout 0 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --logging_steps 2 --report_to none --output_dir "$OUT"
RUN=$(ls -d "$OUT"/v* | sort -V | tail -1)
ev() { echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
       $Q /usr/bin/time -f "$1 wall %e s, user %U s" $TS eval --adapters "$RUN" "${@:2}"; }
# Cold: no cached answers (--eval_use_cache false); the tuned model's GGUF export included.
rm -f "$RUN"/checkpoint-*-merged-*.gguf
ev "llamacpp cold (with GGUF export)" --infer_backend llamacpp --eval_use_cache false
ev "llamacpp cold" --infer_backend llamacpp --eval_use_cache false
ev "llamacpp fill cache" --infer_backend llamacpp
ev "llamacpp warm" --infer_backend llamacpp
ev "pt cold" --infer_backend pt --eval_use_cache false
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
