"""Several GPUs: LoRA with DDP against one GPU, and full fine-tuning with FSDP2 (and ZeRO-3).

Every run is ``tunesmith sft`` exactly as a user starts it, in a fresh process tree:
``NPROC_PER_NODE=N python -m tunesmith sft …`` (tunesmith's launcher, torchrun, Accelerate),
or one plain process for the single-GPU baseline, all in the same call so the ratio compares
like with like. Runs:

- ``lora_1``: LoRA (r8, all linear layers) on one process: the baseline;
- ``lora_ddp``: the same on N processes (DDP, each with its own batch: N times the tokens);
- ``full_fsdp``: full-parameter fine-tuning on N processes with ``--fsdp full_shard``
  (fp32 master weights, bf16 compute, sharded weights/gradients/Adam state);
- ``full_zero3``: the same with ``--deepspeed zero3`` (only where DeepSpeed is installed).

Figures per run (one JSON line, from the run's ``logging.jsonl``): median tokens/s of all
processes together over the steps after the first two, the peak memory of the busiest process
(GPU: ``max_memory_allocated``; CPU: resident memory), the last loss; the speed-up of each run
over ``lora_1``. Samples are cut to exactly SEQ tokens, batch 1 per process, gradient
checkpointing on, 8 steps. Weights are random (``bench/gpu_train.py``'s shapes and builder).

Usage (``--tokenizer``: a directory with the Qwen2.5 tokenizer):
    python bench/multi_gpu.py --tokenizer /tmp/tok --shape 7b --nproc 2 --seq 2048
    python bench/multi_gpu.py --tokenizer DEMO_DIR --device cpu --shape tiny --seq 256  # plumbing
Results: printed, and appended to $OUT/multi_gpu.jsonl (else bench/out/multi_gpu.jsonl).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu_train import ROOT, SHAPES, make_model, write_dataset

RUNS = ("lora_1", "lora_ddp", "full_fsdp", "full_zero3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="directory with the Qwen2.5 tokenizer")
    p.add_argument("--shape", default="7b", choices=list(SHAPES))
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the parallel runs")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--seq", type=int, default=2048, help="tokens per sample")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--work", default="/tmp/tunesmith-multi-gpu", help="model, data, runs")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--device", default="cuda", help="cpu: 2 gloo processes, --shape tiny")
    a = p.parse_args()
    work = Path(a.work)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model_dir = work / f"qwen2.5-{a.shape}-random"
    if not (model_dir / ".complete").is_file():
        make_model(a.shape, str(model_dir), a.tokenizer, a.device)
    data = write_dataset(work / "data" / f"long-{a.seq}.jsonl", a.seq, n=16 * a.nproc)
    results: list[dict] = []
    t_all = time.perf_counter()
    for run in a.runs:
        if run == "full_zero3" and importlib.util.find_spec("deepspeed") is None:
            r = {"run": run, "skipped": "DeepSpeed is not installed (tunesmith[deepspeed])"}
        elif run == "full_zero3" and a.device == "cpu":
            r = {"run": run, "skipped": "DeepSpeed runs on GPUs only here"}
        else:
            r = measure(run, model_dir, data, a, work)
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(out_dir / "multi_gpu.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
    print(table(results))
    print(f"total {time.perf_counter() - t_all:.0f}s; logs in {work / 'logs'}")


def measure(run: str, model_dir: Path, data: Path, a: argparse.Namespace, work: Path) -> dict:
    """One ``tunesmith sft`` run in its own process tree; figures from its logging.jsonl."""
    out = work / "runs" / f"{run}-{a.shape}-{a.seq}"
    argv = [
        "--model", str(model_dir), "--dataset", str(data), "--torch_dtype", "bfloat16",
        "--max_length", str(a.seq), "--truncation_strategy", "right",
        "--max_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "100000",
        "--save_only_model", "true", "--report_to", "none", "--output_dir", str(out),
        "--per_device_train_batch_size", "1", "--gradient_checkpointing", "true",
        "--learning_rate", "1e-5", "--dataset_shuffle", "false",
    ]  # fmt: skip
    if run.startswith("lora"):
        argv += ["--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "32",
                 "--lora_dropout", "0", "--target_modules", "all-linear"]  # fmt: skip
    else:
        argv += ["--train_type", "full"]
        argv += ["--fsdp", "full_shard"] if run == "full_fsdp" else ["--deepspeed", "zero3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["TUNESMITH_CACHE"] = str(work / "cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    nproc = 1 if run == "lora_1" else a.nproc
    if nproc > 1:
        env["NPROC_PER_NODE"] = str(nproc)
    elif a.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    log = work / "logs" / f"{run}-{a.shape}.log"
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tunesmith", "sft", *argv], stdout=f, stderr=f,
                env=env, timeout=a.timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"run": run, "error": f"timed out after {a.timeout}s (log: {log})"}
    wall = round(time.perf_counter() - t, 1)
    runs = sorted(out.glob("v*/logging.jsonl"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not runs:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return {"run": run, "error": f"exit {proc.returncode}: {' | '.join(tail)[-600:]}"}
    records = [json.loads(x) for x in runs[-1].read_text().splitlines() if x.strip()]
    records = [r for r in records if "loss" in r]
    steady = records[2:] or records
    return {
        "run": run, "shape": a.shape, "seq": a.seq, "nproc": nproc,
        "tok_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        "peak_gib": round(max(r["memory_gb"] for r in records), 2),
        "loss": records[-1]["loss"], "steps": len(records), "wall_s": wall,
        "device": device_name(a.device), "versions": versions(),
    }  # fmt: skip


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"cpu ({os.cpu_count()} cores)"


def versions() -> str:
    """torch / transformers / peft / accelerate versions of this run."""
    import accelerate
    import peft
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, accelerate {accelerate.__version__}")  # fmt: skip


def table(results: list[dict]) -> str:
    """A compact table; x lora_1 = tokens/s over the single-process LoRA run's."""
    base = next((r["tok_s"] for r in results if r.get("run") == "lora_1" and "tok_s" in r), None)
    rows = ["run         nproc  seq    tok/s     x lora_1  peak GiB/proc  loss", "-" * 68]
    for r in results:
        if "tok_s" not in r:
            rows.append(f"{r['run']:<11} {r.get('error') or r.get('skipped')}"[:160])
            continue
        ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
        rows.append(
            f"{r['run']:<11} {r['nproc']:<6} {r['seq']:<6} {r['tok_s']:<9} {ratio:<9} "
            f"{r['peak_gib']:<14} {r['loss']}"
        )
    device = next((r["device"] for r in results if "device" in r), "?")
    return "\n".join([*rows, f"device: {device}"])


if __name__ == "__main__":
    main()
