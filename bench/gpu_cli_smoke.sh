#!/bin/bash
# GPU smoke of the CLI paths (device tool, carry .carry with bnb.tgz = bitsandbytes, tok.tgz = the demo's
# tokenizer): QLoRA sft on a random demo-shaped model -> infer --adapters (4-bit base, fast decode loop,
# streaming) -> batch JSONL -> export --merge_lora -> infer on the merged model. Ran OK on an H100, 2026-11-24.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tar xzf .carry/bnb.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp
export PYTHONPATH=$PWD/src:/tmp/site
python3 - <<'PY'
import json, torch
from transformers import AutoModelForCausalLM, Qwen2Config, AutoTokenizer
cfg = Qwen2Config.from_pretrained('/tmp/tok')
with torch.device('cuda'):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained('/tmp/m05'); AutoTokenizer.from_pretrained('/tmp/tok').save_pretrained('/tmp/m05')
with open('/tmp/d.jsonl','w') as f:
    for i in range(16):
        f.write(json.dumps({'instruction': f'who are you {i}?', 'output': 'I am Smoke, made by Test.'})+'\n')
PY
T="timeout 150"
$T python3 -m tunesmith sft --model /tmp/m05 --dataset /tmp/d.jsonl --quantization_bit 4 --max_steps 4 --report_to none --output_dir /tmp/out 2>&1 | grep -v "Loading weights" | tail -4
CK=$(ls -d /tmp/out/v*/checkpoint-* | tail -1)
printf 'who are you?\nhello\n' | $T python3 -m tunesmith infer --adapters $CK --stream true --temperature 0 --max_new_tokens 40 2>&1 | grep -v "Loading weights" | tail -8
$T python3 -m tunesmith infer --adapters $CK --val_dataset /tmp/d.jsonl --result_path /tmp/r.jsonl --temperature 0 --max_new_tokens 16 2>&1 | grep -v "Loading weights" | tail -3; head -2 /tmp/r.jsonl
$T python3 -m tunesmith export --adapters $CK --merge_lora true 2>&1 | tail -2
printf 'who are you?\n' | $T python3 -m tunesmith infer --model $CK-merged --temperature 0 --max_new_tokens 40 2>&1 | grep -v "Loading weights" | tail -4
