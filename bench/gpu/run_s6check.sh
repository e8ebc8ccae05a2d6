#!/bin/bash
# Issue 17, session 6, check call: the dropout kernel on the GPU, the loss match (graphs on,
# dropout 0 and 0.05; peft trained first in the same process), and tunesmith sft with dropout
# 0 / 0.05 beside peft with 0.05. Device tool: `bash bench/gpu/run_s6check.sh`, carry [".carry"].
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
tar xzf .carry/site.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 bench/gpu/drop_check.py 2>&1 | tee $OUT/drop_check.log
python3 bench/gpu_train.py --tokenizer /tmp/tok --shapes 7b --steps 6 --timeout 200 \
  --budget ${BUDGET:-470} --work /tmp/w --runs ${RUNS:-lossmatch lora_drop peft_drop lora} 2>&1 \
  | grep -v "Loading weights" | tee $OUT/harness.log
