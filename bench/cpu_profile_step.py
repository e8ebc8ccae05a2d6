"""Where a CPU training step of the peers' recipe goes: torch.profiler over a few steps.

Builds the run exactly as ``tunesmith sft`` does (``train.setup.setup`` with the recipe's flags
from ``bench/cpu_sft.py``), runs some warm-up steps, then profiles ``--steps`` steps of
``train_step`` and prints the operators by self CPU time, grouped into families (matmul,
elementwise, casts, dropout RNG, norms/RoPE/activations, attention, optimizer, autograd
and Python overhead), with wall time per step beside the profiled one.

Usage: python bench/cpu_profile_step.py [--flags "EXTRA SFT FLAGS"] [--warmup 5] [--steps 5]
       [--top 40] [--trace out.json]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

# Operator families, matched on the profiler's event names (first hit wins).
FAMILIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::_efficient_attention")),
    ("dropout rng", ("aten::random_", "aten::bernoulli", "aten::ge", "aten::where")),
    ("casts/copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone")),
    ("optimizer", ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv")),
)


def family(name: str) -> str:
    """The family of one operator name ('other' when none matches)."""
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def main() -> None:
    """Set the run up, warm up, profile, print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flags", default="--torch_dtype bfloat16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--shapes", default="", help="comma list of ops to break down by input shape")
    opts = ap.parse_args()

    from cpu_sft import OUT, PEER, write_dataset
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.cli import parse_args
    from tunesmith.config import SftArgs
    from tunesmith.options import model_options
    from tunesmith.train import sft as sft_mod
    from tunesmith.train.setup import setup
    from tunesmith.train.strategy import parse_strategy
    from tunesmith.utils import seed_everything

    OUT.mkdir(exist_ok=True)
    data = OUT / "self_cognition_40.json"
    write_dataset(data)
    out_dir = Path(tempfile.mkdtemp(prefix="cpu_profile_"))
    argv = ["--dataset", str(data), "--output_dir", str(out_dir)]
    argv += shlex.split(PEER + " " + opts.flags)
    args = parse_args(SftArgs, "sft", "", argv)
    seed_everything(args.seed)
    strategy = parse_strategy(args.fsdp, args.deepspeed, args.quantization_bit)
    run = setup(args, model_options(args, default_model="demo"), out_dir / "run", None, strategy,
                progress=False)  # fmt: skip
    pos = sft_mod.Position()
    pos.window = sft_mod.new_window(time.perf_counter())
    run.loss_module.train()
    batches = iter(run.loader)

    def steps(n: int) -> tuple[float, int]:
        t, tokens = time.perf_counter(), 0
        for _ in range(n):
            micro = [next(batches)]
            tokens += micro[0]["input_ids"].numel()
            sft_mod.train_step(run, pos, micro)
        return time.perf_counter() - t, tokens

    steps(opts.warmup)
    wall, tokens = steps(opts.steps)
    print(f"unprofiled: {wall / opts.steps * 1e3:.0f} ms a step ({tokens / opts.steps:.0f} tokens)")
    if not opts.profile:
        return
    with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(opts.shapes)) as prof:
        wall, tokens = steps(opts.steps)
    print(f"profiled:   {wall / opts.steps * 1e3:.0f} ms a step ({tokens / opts.steps:.0f} tokens)")
    events = prof.key_averages()
    by_family: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
        total += e.self_cpu_time_total
    n = opts.steps
    print(f"\nself CPU time by family (ms a step; all ops {total / n / 1000:.0f} ms):")
    for fam, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:14s} {us / n / 1000:7.1f} ms  {100 * us / total:5.1f} %")
    print(f"\ntop {opts.top} operators by self CPU time (ms a step, calls a step):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: opts.top]:
        print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / n / 1000:8.2f} {e.count // n:6d}")
    for op in filter(None, opts.shapes.split(",")):
        print(f"\n{op} by input shapes (ms a step, calls a step):")
        rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == op]
        for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:12]:
            shapes = str(e.input_shapes)[:70]
            print(f"  {shapes:70s} {e.self_cpu_time_total / n / 1000:8.2f} {e.count // n:6d}")
    if opts.trace:
        prof.export_chrome_trace(opts.trace)


if __name__ == "__main__":
    main()
