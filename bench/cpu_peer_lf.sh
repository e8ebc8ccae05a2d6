#!/bin/bash
# LLaMA-Factory 0.9.5 on the peers' recipe, beside bench/cpu_sft.py's tunesmith rows: the same
# 40 self-cognition records (bench/out/self_cognition_40.json, written by cpu_sft.py), the
# demo model's HF directory, LoRA r8 a32 all-linear, batch 1, 3 epochs, lr 2e-4, cutoff 512,
# the model's bf16 (LLaMA-Factory's recipe on this CPU in shared/peers/README.md), its own
# defaults otherwise (LoRA dropout 0, cosine schedule) -- measured at its best on this CPU:
# - bf16 is `bf16: true` + `use_cpu: true` (bf16 weights, fp32 LoRA, autocast). Without
#   `bf16` it trains in the model's config dtype (bf16 weights, no autocast: not fp32);
#   `pure_bf16` is refused on a CPU. FP32=1 runs the fp32 row: `bf16: false` on a copy of the
#   model whose config says float32 (weights linked, cast at load), as the peers' README did.
# - gradient checkpointing off (its default is on: ~30 % slower a step here, for memory this
#   0.5B model does not need); tcmalloc preloaded when Debian's libtcmalloc-minimal4 is
#   installed, as `tunesmith sft` does (~5 % a step). bench/RESULTS.md "CPU, session 5".
#
# Setup (its own venv; the CPU torch wheel of this machine, torchaudio replaced by an empty
# module and torchvision removed, as the peers' README says):
#   python3 -m venv /tmp/lf-venv
#   /tmp/lf-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl
#   /tmp/lf-venv/bin/pip install -c <(echo torch==2.13.0) llamafactory==0.9.5
#   /tmp/lf-venv/bin/pip uninstall -y torchvision torchaudio
# Usage: [FP32=1] bash bench/cpu_peer_lf.sh [LF_VENV] [EXTRA YAML LINES]   (prints the wall)
set -euo pipefail
VENV=${1:-/tmp/lf-venv}
EXTRA=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA="$HERE/out/self_cognition_40.json"
MODEL=$(ls -d "$HOME"/.cache/tunesmith/models/demo-*/ | grep -v tiny | head -1)
WORK=$(mktemp -d /tmp/cpu_peer_lf.XXXXXX)
STUB="$WORK/stub"
mkdir -p "$STUB/torchaudio" "$WORK/data"
echo '"""empty: torchaudio 2.11 does not load with torch 2.13"""' >"$STUB/torchaudio/__init__.py"
[ -f "$DATA" ] || { echo "run bench/cpu_sft.py once first (it writes $DATA)" >&2; exit 2; }
cp "$DATA" "$WORK/data/self_cognition_40.json"
cat >"$WORK/data/dataset_info.json" <<EOF
{"self_cognition_40": {"file_name": "self_cognition_40.json"}}
EOF
DTYPE="bf16: true"
if [ "${FP32:-0}" = 1 ]; then
  DTYPE="bf16: false"
  M32="$WORK/model-fp32"
  mkdir -p "$M32" && ln -s "$MODEL"/* "$M32"/ && rm "$M32/config.json"
  "$VENV/bin/python" - "$MODEL/config.json" "$M32/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update({k: "float32" for k in ("torch_dtype", "dtype") if k in c} or {"dtype": "float32"})
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
  MODEL="$M32"
fi
TC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
[ -f "$TC" ] && export LD_PRELOAD="$TC${LD_PRELOAD:+:$LD_PRELOAD}"
cat >"$WORK/train.yaml" <<EOF
model_name_or_path: $MODEL
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: 8
lora_alpha: 32
dataset: self_cognition_40
dataset_dir: $WORK/data
template: qwen
cutoff_len: 512
overwrite_cache: true
output_dir: $WORK/out
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 2.0e-4
num_train_epochs: 3
logging_steps: 5
save_steps: 1000
$DTYPE
use_cpu: true
disable_gradient_checkpointing: true
report_to: none
$EXTRA
EOF
echo "LLaMA-Factory run in $WORK (log: $WORK/train.log)"
t0=$(date +%s.%N)
PYTHONPATH="$STUB${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$VENV/bin/llamafactory-cli" train "$WORK/train.yaml" \
  >"$WORK/train.log" 2>&1 || { tail -30 "$WORK/train.log"; exit 1; }
t1=$(date +%s.%N)
grep -E "train_runtime|train_steps_per_second|total_flos|train_loss" "$WORK/train.log" | tail -5
echo "llamafactory wall $(echo "$t1 - $t0" | bc) s, adapter in $WORK/out"
