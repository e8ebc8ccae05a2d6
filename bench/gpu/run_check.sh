#!/bin/bash
# Issue 17, session 5, check call: the eager fast path (fused-AdamW cache fix) against the
# CUDA-graph path at seq 1024 in process (per-step losses), then the harness's loss match
# (peft vs tunesmith with and without graphs, 20 steps). Device tool: `bash
# bench/gpu/run_check.sh`, carry [".carry"].
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
tar xzf .carry/site.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp || exit 1
export PYTHONPATH=/tmp/site
F=lora+group+kernels+loss
python3 bench/gpu_ablate.py --seq 1024 $F $F+graphs 2>&1 | tee $OUT/ablate1024.log
python3 bench/gpu_train.py --tokenizer /tmp/tok --shapes 7b --timeout 200 --work /tmp/w \
  --runs lossmatch 2>&1 | grep -v "Loading weights" | tee $OUT/lossmatch.log
