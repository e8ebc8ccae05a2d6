"""CPU self-cognition benchmark: tunesmith sft on the peers' recipe, with a per-phase breakdown.

The peers (shared/peers/README.md) trained the demo model on 40 self-cognition records (20 zh,
20 en, alpaca format), LoRA r8 α32 all-linear, batch 1, 3 epochs = 120 steps, lr 2e-4,
max_length 512 (LLaMA-Factory 96 s wall with native bf16, 311.6 s in fp32; ms-swift 329.5 s in
fp32). This script writes an equivalent 40-record alpaca file from the builtin set, runs
``tunesmith sft`` in a child process exactly as the CLI does (``tunesmith.cli.main``), times
every phase of that process, then asks every held-out identity probe (greedy) and counts the
answers naming the new model.

The child times, without changing what runs (wrappers around the functions sft calls):
process start (interpreter up to the child's first line), imports (tunesmith, torch,
transformers, peft, accelerate), data (records, tokenizer, tokenizing, per-step collation),
model load (weights + LoRA), forward, backward, optimizer (clip, step, schedule, zero_grad),
checkpoint (writing and rotating), other (the rest of sft: Accelerate set-up, the loop's own
Python, logging, plots) and exit (interpreter teardown, measured by the parent). The phases
add up to the wall time measured around the child.

Usage:
  python bench/cpu_sft.py [--variant NAME=FLAGS ...] [--src DIR ...] [--repeat N]
                          [--max_steps N] [--no-probes] [--matmul]
  - ``--variant``: extra ``tunesmith sft`` flags for one row (default: ``bf16=--torch_dtype
    bfloat16`` where the CPU has native bf16, and ``fp32=--torch_dtype float32``);
  - ``--src``: also run each variant with another source tree (``LABEL=DIR``, e.g. an export
    of an older commit: ``git archive main src | tar -x -C /tmp/base``) — rows are interleaved
    (A B A B ...), so the CPU's drift hits both alike;
  - ``--matmul``: measure the machine's bf16/fp32 matmul rate at the recipe's shapes first.
Results are appended to bench/out/cpu_sft.jsonl; copy the figures into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SRC = ROOT.parent / "src"
OUT = ROOT / "out"
NAME, AUTHOR = ("小智", "XiaoZhi"), ("星河", "Xinghe")
# The peers' recipe, flag for flag (LLaMA-Factory / ms-swift defaults where a flag is not
# given: LoRA dropout 0.05 as ms-swift; the chat template's default system prompt).
PEER = "--model demo --lora_rank 8 --lora_alpha 32 --target_modules all-linear"
PEER += " --num_train_epochs 3 --per_device_train_batch_size 1 --learning_rate 2e-4"
PEER += " --max_length 512 --lora_dropout 0.05 --logging_steps 5 --save_steps 1000"
PHASES = (
    "start",
    "imports",
    "data",
    "model",
    "forward",
    "backward",
    "optimizer",
    "checkpoint",
    "other",
    "exit",
)


def write_dataset(path: Path) -> None:
    """40 alpaca records: the first 20 zh and 20 en of the builtin self-cognition set."""
    from tunesmith.data.self_cognition import self_cognition_records

    rows = []
    for lang in ("zh", "en"):
        for r in self_cognition_records(NAME, AUTHOR, lang=lang)[:20]:
            rows.append({"instruction": r["query"], "input": "", "output": r["response"]})
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def knows_identity(answer: str) -> bool:
    """The answer names the new model or its author (either language)."""
    return any(n.lower() in answer.lower() for n in (*NAME, *AUTHOR))


# --- the child: one `tunesmith sft` with timers around the functions it calls ---------------


def _child(argv: list[str]) -> None:
    """Run ``tunesmith sft ARGV`` in this process and write the phase times to $CPU_SFT_TIMES."""
    t_first = time.time()
    timer: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    timer["start"] = t_first - float(os.environ["CPU_SFT_T0"])
    t = time.perf_counter()
    import accelerate  # noqa: F401  (sft imports these lazily; timed here as imports)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import tunesmith.cli
    import tunesmith.train.sft as sft_mod

    timer["imports"] = time.perf_counter() - t
    _instrument(sft_mod, timer, torch)
    t = time.perf_counter()
    code = tunesmith.cli.main(["sft", *argv])
    sft_total = time.perf_counter() - t
    timer["other"] = sft_total - sum(timer[k] for k in PHASES[2:8])
    timer["t_end"] = time.time()
    Path(os.environ["CPU_SFT_TIMES"]).write_text(json.dumps(timer))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # a normal exit: the teardown is part of the wall


def _instrument(sft_mod, timer: dict[str, float], torch) -> None:
    """Wrap the functions sft() calls so that their time adds up under a phase name."""
    import accelerate
    import peft
    from accelerate.optimizer import AcceleratedOptimizer

    from tunesmith.model import lora

    def timed(phase: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timer[phase] += time.perf_counter() - t

        return wrapper

    import contextlib
    import importlib

    mods = [sft_mod]
    with contextlib.suppress(ModuleNotFoundError):  # sft's set-up, since issue 16's refactor
        mods.append(importlib.import_module("tunesmith.train.setup"))
    phases = {"data": ("load_conversations", "resolve_model", "load_tokenizer", "prepare")}
    phases |= {"model": ("load_model",), "checkpoint": ("save_checkpoint", "rotate")}
    phases["data"] += ("collate",)
    for phase, names in phases.items():
        for name in names:
            # sft() and its set-up helpers call these by their module-level names.
            for mod in mods:
                if name in vars(mod):
                    setattr(mod, name, timed(phase, vars(mod)[name]))
    peft.get_peft_model = timed("model", peft.get_peft_model)
    lora.CausalLMLoss.forward = timed("forward", lora.CausalLMLoss.forward)
    accelerate.Accelerator.backward = timed("backward", accelerate.Accelerator.backward)
    accelerate.Accelerator.clip_grad_norm_ = timed(
        "optimizer", accelerate.Accelerator.clip_grad_norm_
    )
    AcceleratedOptimizer.step = timed("optimizer", AcceleratedOptimizer.step)
    AcceleratedOptimizer.zero_grad = timed("optimizer", AcceleratedOptimizer.zero_grad)
    lr = torch.optim.lr_scheduler.LRScheduler
    lr.step = timed("optimizer", lr.step)


# --- the parent ------------------------------------------------------------------------------


def train(label: str, src: Path, flags: str, max_steps: int | None) -> dict:
    """One timed ``tunesmith sft`` child; returns the wall time, the phases and the log figures."""
    OUT.mkdir(exist_ok=True)
    data = OUT / "self_cognition_40.json"
    write_dataset(data)
    out_dir = OUT / f"sft-{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}"
    argv = ["--dataset", str(data), "--output_dir", str(out_dir), *shlex.split(PEER + " " + flags)]
    if max_steps:
        argv += ["--max_steps", str(max_steps)]
    times = OUT / f"times-{os.getpid()}.json"
    env = os.environ | {"PYTHONPATH": str(src), "CPU_SFT_TIMES": str(times)}
    # The child calls cli.main in-process; the console script would first re-exec itself with
    # a faster malloc where the tree does (utils.malloc_env), so the child gets that here.
    utils_src = (src / "tunesmith" / "utils.py").read_text(encoding="utf-8")
    if "def malloc_env" in utils_src:
        from tunesmith.utils import malloc_env

        env = malloc_env(env) or env
    env["CPU_SFT_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    t_exit = time.time()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    phases = json.loads(times.read_text())
    times.unlink()
    phases["exit"] = t_exit - phases.pop("t_end")
    m = re.search(r"trained (\d+) steps in ([\d.]+)s \((\d+) tokens/s", proc.stderr)
    run_dir = sorted(out_dir.glob("v*"), key=lambda p: p.stat().st_mtime)[-1]
    ckpt = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    return {
        "label": label,
        "src": str(src),
        "command": shlex.join(["tunesmith", "sft", *argv]),
        "wall_s": round(wall, 2),
        "phases_s": {k: round(phases[k], 2) for k in PHASES},
        "steps": int(m.group(1)) if m else None,
        "train_s": float(m.group(2)) if m else None,
        "tokens_per_s": int(m.group(3)) if m else None,
        "checkpoint": str(ckpt),
        "cpu": cpu_flags(),
        "ld_preload": env.get("LD_PRELOAD", ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def probe(ckpt: str, src: Path) -> dict:
    """Greedy answers of the checkpoint to every held-out identity probe (a child process)."""
    code = (
        "import json,sys\n"
        "from tunesmith.cli import parse_args\n"
        "from tunesmith.config import InferCommandArgs\n"
        "from tunesmith.data.self_cognition import identity_probes\n"
        "from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, "
        "load_engine\n"
        "a = parse_args(InferCommandArgs, 'infer', '', ['--adapters', sys.argv[1], "
        "'--temperature', '0', '--max_new_tokens', '48'])\n"
        "e = load_engine(a); g = generation_kwargs(a, e.tokenizer)\n"
        "print(json.dumps([(p['query'], generate(e, chat_messages(e.system, [], p['query']), g))"
        " for p in identity_probes()], ensure_ascii=False))\n"
    )
    env = os.environ | {"PYTHONPATH": str(src)}
    proc = subprocess.run(
        [sys.executable, "-c", code, ckpt], capture_output=True, text=True, env=env, check=True
    )
    pairs = json.loads(proc.stdout.splitlines()[-1])
    answers = [{"q": q, "a": a, "ok": knows_identity(a)} for q, a in pairs]
    right = sum(a["ok"] for a in answers)
    return {"identity_right": right, "probes": len(answers), "answers": answers}


def cpu_flags() -> str:
    """The CPU model and the flags that decide the matmul path (AVX512-BF16, AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if info else set()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model.group(1) if model else '?'}, {os.cpu_count()} cores, {' '.join(wanted)}"


def matmul_rate() -> dict[str, float]:
    """GFLOP/s of the recipe's largest matmul (a ~54-token row block times the 896x4864 MLP
    weight), best of several, in bf16 and fp32, plain (``F.linear``) and with the weight
    prepacked for oneDNN (``--cpu_fast pack``): the bound on the training time."""
    import torch

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(54, 896, dtype=dtype), torch.randn(4864, 896, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        calls = {
            "": partial(torch.nn.functional.linear, x, w),
            " packed": partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""),
        }
        for name, call in calls.items():
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(20):
                    call()
                best = min(best, (time.perf_counter() - t) / 20)
            key = str(dtype).removeprefix("torch.") + name
            out[key] = round(2 * 54 * 896 * 4864 / best / 1e9, 1)
    return out


def row(r: dict) -> str:
    """One line of the printed table."""
    p = r["phases_s"]
    parts = " ".join(f"{k} {p[k]:.1f}" for k in PHASES)
    ident = f", identity {r['identity_right']}/{r['probes']}" if "probes" in r else ""
    return (
        f"{r['label']}: wall {r['wall_s']:.1f} s ({r['steps']} steps, {r['tokens_per_s']} "
        f"tokens/s{ident}) | {parts} | sum {sum(p.values()):.1f}"
    )


def main() -> None:
    """Parse the options, run the rows interleaved, print and append the results."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max_steps", type=int, default=None)
    ap.add_argument("--no-probes", dest="probes", action="store_false")
    ap.add_argument("--matmul", action="store_true")
    opts = ap.parse_args()
    sys.path.insert(0, str(SRC))
    from tunesmith.model.load import cpu_has_native_bf16

    variants = [v.split("=", 1) for v in opts.variant]
    if not variants:
        variants = [["fp32", "--torch_dtype float32"]]
        if cpu_has_native_bf16():
            variants.insert(0, ["bf16", "--torch_dtype bfloat16"])
    srcs = [s.split("=", 1) for s in opts.src] or [["now", str(SRC)]]
    print(f"CPU: {cpu_flags()}", flush=True)
    if opts.matmul:
        print(f"matmul GFLOP/s at the recipe's shape: {matmul_rate()}", flush=True)
    for rep in range(opts.repeat):
        for name, flags in variants:
            for src_label, src in srcs:
                label = f"{name}@{src_label}" if len(srcs) > 1 else name
                r = train(label, Path(src).resolve(), flags, opts.max_steps)
                r["repeat"] = rep
                if opts.probes:
                    r |= probe(r["checkpoint"], Path(src).resolve())
                print(row(r), flush=True)
                with open(OUT / "cpu_sft.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
