#!/bin/bash
# Issue 17, session 5, exploratory call: CUDA graphs per decoder layer and the host-memory
# embedding, in process (bench/gpu_ablate.py: eager fast path vs + graphs, + embed, no
# checkpointing; the per-step losses must match) and through `tunesmith sft` (bench/gpu_train.py
# rows with --fast all). Device tool: `bash bench/gpu/run_graphs.sh`, carry [".carry"].
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
tar xzf .carry/site.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
F=lora+group+kernels+loss
python3 bench/gpu_ablate.py $F $F+graphs $F+graphs+embed $F+graphs+nockpt 2>&1 \
  | tee $OUT/ablate.log
python3 bench/gpu_train.py --tokenizer /tmp/tok --shapes 7b --steps 6 --timeout 150 \
  --budget ${BUDGET:-330} --work /tmp/w --runs peft lora_all qlora_all lora_all_nockpt lora \
  2>&1 | grep -v "Loading weights" | tee $OUT/harness.log
