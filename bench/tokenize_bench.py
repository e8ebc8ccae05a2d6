"""Data pipeline speed: read, validate and tokenize 100k alpaca records (demo tokenizer).

Generates ``bench/out/alpaca_100k.jsonl`` (seeded, mixed zh/en, ~60 words a record), then
times ``tunesmith.data.prepare.prepare`` — reading, validation, chat template, tokenization
with labels — cold (no cache) with 1 and 2 processes, and warm (from the on-disk cache).

Usage: .venv/bin/python bench/tokenize_bench.py [N]    (default N = 100000)
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tunesmith.cli import parse_args
from tunesmith.config import DataCommandArgs
from tunesmith.data.prepare import prepare
from tunesmith.model.load import load_tokenizer, resolve_model
from tunesmith.options import data_options, template_options

OUT = Path(__file__).resolve().parent / "out"
EN = "the model learns from data and answers questions about science history code and math"
EN = EN.split()
ZH = list("模型从数据中学习并回答关于科学历史代码和数学的问题")


def make(path: Path, n: int) -> None:
    """Write ``n`` alpaca records; a tenth have an ``input``, a tenth a ``system``."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = EN if i % 2 else ZH
            sep = " " if i % 2 else ""
            rec = {
                "instruction": sep.join(rng.choices(words, k=rng.randint(5, 25))),
                "input": sep.join(rng.choices(words, k=8)) if i % 10 == 0 else "",
                "output": sep.join(rng.choices(words, k=rng.randint(20, 80))),
            }
            if i % 10 == 5:
                rec["system"] = "You are a helpful assistant."
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    OUT.mkdir(exist_ok=True)
    path = OUT / f"alpaca_{n // 1000}k.jsonl"
    if not path.exists():
        make(path, n)
    tokenizer = load_tokenizer(resolve_model("demo"))
    results = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TUNESMITH_CACHE"] = cache  # cold start: an empty tokenization cache
        for label, procs in (("cold, 1 process", 1), ("cold, 2 processes", 2), ("warm", 2)):
            if label.startswith("cold"):
                for p in Path(cache).glob("tokenized/*"):
                    import shutil

                    shutil.rmtree(p)
            args = parse_args(
                DataCommandArgs,
                "data",
                "",
                ["--dataset", str(path), "--dataset_num_proc", str(procs), "--max_length", "2048"],
            )
            t0 = time.perf_counter()
            data = prepare(data_options(args), template_options(args), tokenizer, progress=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(s.input_ids) for s in data.train)
            results.append((label, dt, len(data.train), tokens))
            print(
                f"{label}: {dt:.1f} s for {len(data.train)} samples, {tokens} tokens "
                f"({len(data.train) / dt:.0f} records/s)",
                flush=True,
            )
    with open(OUT / "tokenize_bench.jsonl", "a", encoding="utf-8") as f:
        for label, dt, samples, tokens in results:
            row = {"run": label, "seconds": round(dt, 2), "samples": samples, "tokens": tokens}
            f.write(json.dumps(row | {"date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")


if __name__ == "__main__":
    main()
