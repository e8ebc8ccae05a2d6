#!/bin/bash
# Issue 17, debugging call: where the fast path's step time goes (bench/gpu_ablate.py, one
# fresh process per variant, 7B shape built on the GPU), then a smoke run on the 0.5B shape of
# the harness rows that had never run (mixed-length data, loss match and Liger with
# checkpointing, Unsloth QLoRA). Device tool: `bash bench/gpu/run_ablate.sh`, carry [".carry"].
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
tar xzf .carry/site.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 bench/gpu_ablate.py none lora+v1 lora lora+group lora+kernels+loss+v1 \
  lora+group+kernels+loss lora+group+kernels+loss+nockpt 2>&1 | tee $OUT/ablate.log
python3 bench/gpu_ablate.py --seq 8192 lora+group+kernels+loss 2>&1 | tee -a $OUT/ablate.log
python3 bench/gpu_ablate.py --timeout 200 kernels+loss+compile 2>&1 | tee -a $OUT/ablate.log
python3 bench/gpu_train.py --tokenizer /tmp/tok --shapes 0.5b --steps 3 --timeout 120 \
  --work /tmp/w --runs peft_mixed lora_mixed lossmatch peft_liger unsloth_qlora 2>&1 \
  | grep -v "Loading weights" | tee $OUT/smoke.log
