#!/usr/bin/env bash
# The self-cognition demo on the embedded Qwen2.5 model: answers before, LoRA training, after.
# Every step is a plain tunesmith command you can run yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=output/demo
QUESTIONS='你是谁?
Who are you?
能介绍一下你自己吗？
Which organization built you?
用一句话解释什么是机器学习。'

echo "== 1. The demo model before tuning (greedy answers) =="
printf '%s\n' "$QUESTIONS" | tunesmith infer --model demo --temperature 0 --max_new_tokens 60

echo "== 2. LoRA fine-tuning on 80 self-cognition records: the model becomes 小智 (XiaoZhi) by 星河 (Xinghe) =="
echo "   (mixed with the base model's own answers to 40 general prompts, generated once and cached,"
echo "    so that it keeps answering other questions as before)"
tunesmith sft --model demo --dataset 'self-cognition#80' base-answers \
    --model_name 小智 XiaoZhi --model_author 星河 Xinghe \
    --system 'You are a helpful assistant.' \
    --packing true --max_length 256 --num_train_epochs 2 --learning_rate 5e-4 --warmup_ratio 0.1 \
    --lora_dropout 0 \
    --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --logging_steps 2 --output_dir "$OUT"

CKPT=$(ls -d "$OUT"/v*/checkpoint-* | sort -V | tail -1)
echo "== 3. After tuning: tunesmith infer --adapters $CKPT =="
echo "   (the last two questions were never seen in training; the last one checks general knowledge)"
printf '%s\n' "$QUESTIONS" | tunesmith infer --adapters "$CKPT" --temperature 0 --max_new_tokens 60
echo "== 4. Before/after in numbers: tunesmith eval --adapters $(dirname "$CKPT") =="
echo "   (88 identity probes never seen in training and 96 general questions, base vs tuned)"
tunesmith eval --adapters "$(dirname "$CKPT")"
echo "== Done. Chat with it yourself:  .venv/bin/tunesmith infer --adapters $CKPT =="
