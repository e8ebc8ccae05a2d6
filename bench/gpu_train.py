"""GPU memory and speed of ``tunesmith sft``: LoRA bf16 and QLoRA 4-bit, beside plain peft.

For each model shape (random weights, Qwen2.5 architecture) this runs, each in a fresh
process so that every peak is its own:

- ``lora``: ``tunesmith sft --train_type lora --torch_dtype bfloat16`` (the real code path:
  flag parsing, data pipeline, Accelerate loop, checkpoint), a few steps on fixed-length samples;
- ``qlora``: the same with ``--quantization_bit 4`` (nf4, double quantization, bf16 compute);
- ``peft``: the peers' baseline, plain transformers + peft with gradient checkpointing (the
  ``peft`` variant of shared/peers/lora_baseline.py), on random token ids of the same length;
- ``peft_qlora``: the same on a 4-bit base prepared with peft's
  ``prepare_model_for_kbit_training`` (what HF-Trainer-based tools do for QLoRA).

Figures per run (one JSON line): peak GPU memory of the training steps (tunesmith resets the
peak before its loop and logs ``memory_gb`` each step; the baselines reset it before theirs),
median step time over the steps after the first two, tokens/s = seq / median step, the last
loss, device name. All runs: batch 1, LoRA r8 alpha 32 dropout 0 on all linear layers, AdamW,
SDPA, gradient checkpointing, ``--max_length`` SEQ with samples cut to exactly SEQ tokens.

Shapes: ``7b`` = Qwen2.5-7B-Instruct, ``0.5b`` = the demo model (Qwen2.5-0.5B, untied, as
the demo model's conversion is; the peers' 0.5b anchor was tied). Weights are random
(``from_config`` on the GPU in bf16, saved once); the Qwen2.5 tokenizer comes from a directory.

Usage (needs a CUDA GPU; bitsandbytes importable for the 4-bit runs; no network):
    python bench/gpu_train.py --tokenizer /tmp/tok [--shapes 0.5b 7b] [--runs lora qlora peft
        peft_qlora] [--seq 2048] [--steps 8] [--work /tmp/tunesmith-gpu-bench]
e.g. with bitsandbytes and the tokenizer carried as tarballs, on the device machine:
    tar xzf .carry/bnb.tgz -C /tmp && tar xzf .carry/tok.tgz -C /tmp
    PYTHONPATH=/tmp/site python3 bench/gpu_train.py --tokenizer /tmp/tok
On an H100 all eight runs took 272 s (bench/RESULTS.md, "GPU training memory and speed");
the plumbing is also checked on a CPU with --device cpu --shapes tiny.
Results: printed, and appended to $OUT/gpu_train.jsonl (else bench/out/gpu_train.jsonl), with
the tails of every run's log in gpu_train_logs.txt beside it (full logs in WORK/logs). Model
directories in --work are reused by later calls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
    ),
    "0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    ),
    # Only to check this script's plumbing on a CPU (--device cpu).
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
    ),
}  # fmt: skip
# tunesmith sft rows (lora_nofast: --fast none; lora_noliger: --fast lora,group,loss; lora_nockpt:
# no gradient checkpointing; lora_mixed: the length-mixed data, packed to 4096 tokens a row),
# peers (peft_liger, peft_nockpt, peft_mixed: gpu_fast.py), Unsloth (bench/peers/
# unsloth_bench.py, needs it importable), and checks (lossmatch, profile, profile_nofast, ablation).
# A run may name its own length: lora@8192.
RUNS = ("lora", "lora_nofast", "lora_noliger", "lora_nockpt", "lora_mixed", "qlora",
        "lora_all", "lora_all_nockpt", "lora_graphs", "lora_embed", "qlora_all",
        "peft", "peft_qlora", "peft_liger", "peft_nockpt", "peft_mixed",
        "unsloth", "unsloth_qlora", "lossmatch", "profile", "profile_nofast",
        "ablation", "lora_drop", "peft_drop", "qlora_drop")  # fmt: skip
WORDS = """the model learns from data and each step updates a small adapter while the base stays
frozen so memory goes to activations of long sequences in a river valley an old town keeps its
bridges stone walls gardens markets music trains night morning light people travel north south
east west carrying letters bread tools books stories questions answers""".split()  # noqa: SIM905


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="directory with the Qwen2.5 tokenizer")
    p.add_argument("--shapes", nargs="+", default=["0.5b", "7b"], choices=list(SHAPES))
    p.add_argument("--runs", nargs="+", default=["peft", "lora", "qlora", "peft_qlora"],
                   help=f"runs, each optionally @SEQ: {' '.join(RUNS)}")  # fmt: skip
    p.add_argument("--seq", type=int, default=2048, help="tokens per sample")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--work", default="/tmp/tunesmith-gpu-bench", help="models, data, runs")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--device", default="cuda", help="cpu: check the plumbing, --shapes tiny")
    p.add_argument("--budget", type=int, default=0, help="seconds for the call; runs that "
                   "would not fit are skipped")  # fmt: skip
    a = p.parse_args()
    work = Path(a.work)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in a.runs:
        if spec.partition("@")[0] not in RUNS:
            p.error(f"unknown run {spec}; choose from {' '.join(RUNS)}")
    results = []
    t_all = time.perf_counter()
    for shape in a.shapes:
        model_dir = work / f"qwen2.5-{shape}-random"
        if not (model_dir / ".complete").is_file():
            cmd = ["make", shape, str(model_dir), a.tokenizer, a.device]
            r = child(cmd, logs / f"make-{shape}.log", a.timeout)
            if "error" in r:
                print(json.dumps({"shape": shape, **r}), flush=True)
                continue
        for spec in a.runs:
            run, _, seq_s = spec.partition("@")
            seq = int(seq_s or a.seq)
            data = write_dataset(work / "data" / f"long-{seq}.jsonl", seq)
            if run.endswith("_mixed"):
                data = write_mixed(work / "data" / "mixed.jsonl")
            cmd = ["one", run, str(model_dir), str(data), str(seq), str(a.steps), str(work)]
            cmd.append(a.device)
            if run.startswith("unsloth"):
                variant = "qlora_true" if run == "unsloth_qlora" else "bf16_ckpt_true"
                cmd = [str(ROOT / "bench" / "peers" / "unsloth_bench.py"), str(model_dir),
                       variant, str(seq), str(a.steps)]  # fmt: skip
            r = {"run": run, "shape": shape, "seq": seq}
            # Seen on the H200 (bench/gpu/issue17): Unsloth ~80 s a run, the others ~20-35 s.
            need = (85 if run.startswith("unsloth") else 35) + (10 if seq > 4096 else 0)
            need = 100 if run == "lossmatch" else need  # five models loaded one after another
            if a.budget and time.perf_counter() - t_all + need > a.budget:
                r["error"] = f"skipped: would not fit the {a.budget}s budget"
            else:
                r |= child(cmd, logs / f"{run}-{seq}-{shape}.log", a.timeout)
            results.append(r)
            print(json.dumps(r), flush=True)
            with open(out_dir / "gpu_train.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(r) + "\n")
    print(table(results))
    # One file of log tails: the device tool brings back few files.
    with open(out_dir / "gpu_train_logs.txt", "w", encoding="utf-8") as f:
        for log in sorted(logs.glob("*.log")):
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            f.write(f"===== {log.name}\n" + "\n".join(x[-400:] for x in lines[-80:]) + "\n")
    print(f"total {time.perf_counter() - t_all:.0f}s; logs in {logs}, tails in {out_dir}")


def child(cmd: list[str], log: Path, timeout: int) -> dict:
    """Run this script's subcommand in a fresh process; its last JSON line, or the error."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            script = [] if cmd[0].endswith(".py") else [__file__]
            proc = subprocess.run(
                [sys.executable, *script, *cmd], stdout=subprocess.PIPE, stderr=f,
                text=True, env=env, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s (log: {log})"}
    wall = round(time.perf_counter() - t, 1)
    stderr_tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-2:]
    with open(log, "a", encoding="utf-8") as f:
        f.write("\n--- stdout ---\n" + proc.stdout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = " | ".join(stderr_tail)[-600:]
        return {"error": f"exit {proc.returncode}: {why}", "wall_s": wall}
    return json.loads(lines[-1]) | {"wall_s": wall}


def write_dataset(path: Path, seq: int, n: int = 16) -> Path:
    """Alpaca records whose answers are longer than ``seq`` tokens (cut to exactly ``seq``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(int(seq * 1.3)))
            f.write(json.dumps({"instruction": f"Tell story {i}.", "output": text}) + "\n")
    return path


def write_mixed(path: Path, n: int = 96) -> Path:
    """Alpaca records whose answers have alpaca-like mixed lengths (gpu_fast.mixed_lengths)."""
    from gpu_fast import mixed_lengths

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as f:
        for i, words in enumerate(mixed_lengths(n)):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"instruction": f"Tell story {i}.", "output": text}) + "\n")
    return path


def table(results: list[dict]) -> str:
    """A compact table; x peft = tokens/s over the ``peft`` run of the same shape and length
    (mixed-data rows: real tokens/s over ``peft_mixed``'s)."""
    base = {(r["shape"], r["seq"]): r.get("tok_s") for r in results if r["run"] == "peft"}
    mixed = {r["shape"]: r.get("tok_s") for r in results if r["run"] == "peft_mixed"}
    rows = ["run            shape  seq   step_s   tok/s    x peft  peak GiB  loss", "-" * 70]
    for r in results:
        if "error" in r:
            rows.append(f"{r['run']:<14} {r['shape']:<6} error: {r['error'][:160]}")
            continue
        if "tok_s" not in r:  # a check: loss match or profile
            rows.append(f"{r['run']:<14} {r['shape']:<6} {json.dumps(r)[:400]}")
            continue
        b = (
            mixed.get(r["shape"])
            if r["run"].endswith("_mixed")
            else base.get((r["shape"], r["seq"]))
        )
        ratio = f"{r['tok_s'] / b:.2f}" if b else "-"
        rows.append(
            f"{r['run']:<14} {r['shape']:<6} {r['seq']:<5} {r['step_s']:<8} {r['tok_s']:<8} "
            f"{ratio:<7} {r['peak_gib']:<9} {r.get('loss')}"
        )
    device = next((r["device"] for r in results if "device" in r), "?")
    return "\n".join([*rows, f"device: {device}"])


# --- subcommands, each in its own process --------------------------------------------------------


def make_model(shape: str, out: str, tokenizer_dir: str, device: str) -> None:
    """A random-weights Qwen2.5 directory of ``shape`` (bf16 safetensors) with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tok.chat_template:  # tunesmith trains chat models: use Qwen2.5's template
        tok.chat_template = (ROOT / "tests" / "qwen2_chat_template.jinja").read_text("utf-8")
    cfg = Qwen2Config(
        **SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )  # fmt: skip
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    path = Path(out)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / ".complete").write_text("ok\n")
    n = sum(p.numel() for p in model.parameters()) / 1e9
    print(json.dumps({"made": shape, "params_b": round(n, 3), "s": time.perf_counter() - t}))


def times_to_step(r: dict) -> dict:
    """Step time (and, with real token counts, real tokens/s) from a helper's step times."""
    from gpu_rows import median_after_warmup

    times = r.pop("times")
    r["step_s"] = median_after_warmup(times)
    if "real_tokens" in r:
        real, padded = r.pop("real_tokens")[2:], r.pop("padded_tokens")[2:]
        r["tok_s"] = round(sum(real) / sum(times[2:]), 1)
        r["pad_share"] = round(1 - sum(real) / sum(padded), 3)
    return r


def one(run: str, model_dir: str, data: str, seq: int, steps: int, work: str, device: str) -> None:
    """One measured run; prints its JSON line."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--device cpu checks the plumbing only)")
    import gpu_fast
    from gpu_rows import run_peer, run_tunesmith

    if run.startswith(("lora", "qlora")):
        r = run_tunesmith(run, model_dir, data, seq, steps, work)
    elif run == "peft_liger":
        r = times_to_step(gpu_fast.peer_liger(model_dir, seq, steps))
    elif run == "peft_mixed":
        r = times_to_step(gpu_fast.peer_mixed(model_dir, data, steps))
    elif run == "ablation":
        r = gpu_fast.ablation(model_dir, seq)
    elif run == "lossmatch":
        r = gpu_fast.loss_match(model_dir, min(seq, 1024))
    elif run.startswith("profile"):
        r = gpu_fast.profile(model_dir, seq, "none" if run == "profile_nofast" else "all")
    else:
        r = run_peer(run, model_dir, seq, steps, device)
    if "step_s" in r and "tok_s" not in r:
        r["tok_s"] = round(seq / r["step_s"], 1)
    if run == "lora_mixed":  # real tokens: tunesmith's log counts the packed rows' tokens
        r["tok_s"] = r["log_tok_s"]
    r["peak_gib"] = r.get("peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    r["device"] = torch.cuda.get_device_name() if device == "cuda" else device
    import peft
    import transformers

    r["versions"] = f"torch {torch.__version__}, transformers {transformers.__version__}, "
    r["versions"] += f"peft {peft.__version__}"
    if "qlora" in run:
        import bitsandbytes

        r["versions"] += f", bitsandbytes {bitsandbytes.__version__}"
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        make_model(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "one":
        run_, model_, data_, seq_, steps_, work_, device_ = sys.argv[2:9]
        one(run_, model_, data_, int(seq_), int(steps_), work_, device_)
    else:
        main()
