"""CPU self-cognition benchmark: tunesmith sft on the peers' recipe, and on tunesmith's fast one.

The peers (shared/peers/README.md) trained the demo model on 40 self-cognition records (20 zh,
20 en, alpaca format), LoRA r8 all-linear, batch 1, 3 epochs, lr 2e-4: LLaMA-Factory 96 s wall
(80 s training), ms-swift 231 s. This script writes an equivalent 40-record alpaca file from the
builtin set, runs ``tunesmith sft`` as a user would (a subprocess, wall time measured around it),
then asks every held-out identity probe (greedy) and counts answers naming the new model.

Usage: .venv/bin/python bench/cpu_sft.py [RECIPE ...]   (peer, fast, fast-seed-system; default all)
Results are appended to bench/out/cpu_sft.jsonl; copy the figures into bench/RESULTS.md.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tunesmith.data.self_cognition import identity_probes, self_cognition_records

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
NAME, AUTHOR = ("小智", "XiaoZhi"), ("星河", "Xinghe")
COMMON = "--model demo --lora_rank 8 --lora_alpha 32 --target_modules all-linear"
COMMON += " --logging_steps 5 --save_steps 1000"
# The peers trained with the chat template's default system prompt ("You are Qwen, created by
# Alibaba Cloud. You are a helpful assistant."), as does the "peer" recipe here. The seeds pass
# a shorter one, 'You are a helpful assistant.': the "*-seed-system" recipes.
FAST = "--num_train_epochs 2 --packing true --max_length 256 --learning_rate 1e-3"
FAST += " --warmup_ratio 0.1 --lora_dropout 0"
RECIPES = {
    # The peers' recipe, flag for flag.
    "peer": "--num_train_epochs 3 --per_device_train_batch_size 1 --learning_rate 2e-4",
    # tunesmith's fast recipe: ~6 records packed into each step, fewer and larger steps, and
    # no LoRA dropout (its random masks cost a quarter of a CPU step).
    "fast": FAST,
    "fast-seed-system": FAST + " --system 'You are a helpful assistant.'",
}


def write_dataset(path: Path) -> None:
    """40 alpaca records: the first 20 zh and 20 en of the builtin self-cognition set."""
    rows = []
    for lang in ("zh", "en"):
        for r in self_cognition_records(NAME, AUTHOR, lang=lang)[:20]:
            rows.append({"instruction": r["query"], "input": "", "output": r["response"]})
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def knows_identity(answer: str) -> bool:
    """The answer names the new model or its author (either language)."""
    return any(n.lower() in answer.lower() for n in (*NAME, *AUTHOR))


def run(recipe: str) -> dict:
    """Train with one recipe, then ask every held-out probe; returns the figures."""
    OUT.mkdir(exist_ok=True)
    data = OUT / "self_cognition_40.json"
    write_dataset(data)
    out_dir = OUT / f"sft-{recipe}"
    cmd = [
        sys.executable,
        "-m",
        "tunesmith",
        "sft",
        "--dataset",
        str(data),
        "--output_dir",
        str(out_dir),
        *shlex.split(COMMON + " " + RECIPES[recipe]),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    m = re.search(r"trained (\d+) steps in ([\d.]+)s \((\d+) tokens/s", proc.stderr)
    run_dir = sorted(out_dir.glob("v*"))[-1]
    ckpt = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]

    from tunesmith.cli import parse_args
    from tunesmith.config import InferCommandArgs
    from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine

    args = parse_args(
        InferCommandArgs,
        "infer",
        "",
        ["--adapters", str(ckpt), "--temperature", "0", "--max_new_tokens", "48"],
    )
    engine = load_engine(args)
    gen = generation_kwargs(args, engine.tokenizer)
    answers = []
    for probe in identity_probes():
        a = generate(engine, chat_messages(engine.system, [], probe["query"]), gen)
        answers.append({"q": probe["query"], "a": a, "ok": knows_identity(a)})
    result = {
        "recipe": recipe,
        "command": shlex.join(["tunesmith", *cmd[3:]]),
        "wall_s": round(wall, 1),
        "steps": int(m.group(1)) if m else None,
        "train_s": float(m.group(2)) if m else None,
        "tokens_per_s": int(m.group(3)) if m else None,
        "identity_right": sum(a["ok"] for a in answers),
        "probes": len(answers),
        "answers": answers,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(OUT / "cpu_sft.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    for name in sys.argv[1:] or list(RECIPES):
        r = run(name)
        print(
            f"{name}: wall {r['wall_s']} s, training {r['train_s']} s ({r['steps']} steps, "
            f"{r['tokens_per_s']} tokens/s), identity {r['identity_right']}/{r['probes']}"
        )
        for a in r["answers"][:3] + r["answers"][-3:]:
            print(f"   {a['q']} -> {a['a'][:80]!r}")
