#!/bin/bash
# Issue 17's harness in one device call: bench/gpu_train.py on the 7B shape, runs given as
# arguments (default: every row of the table). Needs .carry/ from
# bench/peers/make_carry.sh (site.tgz: Unsloth, Liger, bitsandbytes, peft 0.21.2 ...; tok.tgz).
# Device tool: command `bash bench/gpu/run_fast.sh [RUN ...]`, carry [".carry"].
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
tar xzf .carry/site.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Every row of the table, the most wanted first (a run that would not fit the call's
# 560 s is skipped and says so).
# The loss match (lossmatch: ~85 s, five models) runs in its own call since session 6
# (bench/gpu/run_s6check.sh): with the dropout rows the table alone fills the call.
RUNS=${*:-peft lora lora_drop peft_drop unsloth qlora unsloth_qlora peft@8192 lora@8192 \
  peft_liger lora_nockpt peft_mixed lora_mixed unsloth@8192}
python3 bench/gpu_train.py --tokenizer /tmp/tok --shapes 7b --steps 6 --timeout 150 \
  --budget ${BUDGET:-560} --work /tmp/w --runs $RUNS 2>&1 | grep -v "Loading weights" \
  | tee $OUT/harness.log
