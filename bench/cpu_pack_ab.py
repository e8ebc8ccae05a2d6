"""``--cpu_fast pack`` on and off in ONE process, step by step on the same batches.

Whole-run rows of ``bench/cpu_sft.py`` run minutes apart, and this machine's speed drifts by
10-20 % between minutes, so a 10 % effect cannot be read from two of them. Here the run is
built exactly as ``tunesmith sft`` builds it (``--cpu_fast auto``), the grouped LoRA layers
are switched between prepacked and plain base weights, and every batch is run forward and
backward with both, alternating (A B B A ...), timing forward and backward apart. The
optimizer does not step (the weights stay the same for both).

Usage: python bench/cpu_pack_ab.py [--flags "--torch_dtype bfloat16"] [--batches 30]
                                   [--rounds 2]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Build the run, warm both modes up, then time them alternately and print the sums."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flags", default="--torch_dtype bfloat16")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    opts = ap.parse_args()

    from cpu_sft import OUT, PEER, write_dataset

    from tunesmith.cli import parse_args
    from tunesmith.config import SftArgs
    from tunesmith.options import model_options
    from tunesmith.train.setup import setup
    from tunesmith.train.strategy import parse_strategy
    from tunesmith.utils import seed_everything

    OUT.mkdir(exist_ok=True)
    data = OUT / "self_cognition_40.json"
    write_dataset(data)
    out_dir = Path(tempfile.mkdtemp(prefix="cpu_pack_ab_"))
    argv = ["--dataset", str(data), "--output_dir", str(out_dir)]
    args = parse_args(SftArgs, "sft", "", argv + shlex.split(PEER + " " + opts.flags))
    seed_everything(args.seed)
    strategy = parse_strategy(args.fsdp, args.deepspeed, args.quantization_bit)
    run = setup(args, model_options(args, default_model="demo"), out_dir / "run", None, strategy,
                progress=False)  # fmt: skip
    run.loss_module.train()
    groups = {id(m._tunesmith_group): m._tunesmith_group for m in run.loss_module.modules()
              if hasattr(m, "_tunesmith_group")}.values()  # fmt: skip
    it = iter(run.loader)
    batches = [next(it) for _ in range(opts.batches)]
    tokens = sum(b["input_ids"].numel() for b in batches)

    def step(batch: dict, pack: bool) -> tuple[float, float]:
        for g in groups:
            g.pack = pack
        t0 = time.perf_counter()
        loss_sum, n, _ = run.loss_module(**batch)
        t1 = time.perf_counter()
        run.accelerator.backward(loss_sum / n)
        t2 = time.perf_counter()
        run.optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    for b in batches:  # warm-up: packing, oneDNN primitives for every shape, both modes
        step(b, True)
        step(b, False)
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for r in range(opts.rounds):
        for i, b in enumerate(batches):
            order = (True, False) if (i + r) % 2 == 0 else (False, True)
            for pack in order:
                f, bw = step(b, pack)
                totals[pack][0] += f
                totals[pack][1] += bw
    n = opts.rounds * len(batches)
    print(
        f"{len(groups)} LoRA groups, {n} steps a mode ({tokens / len(batches):.0f} tokens a step)"
    )
    for pack, (f, bw) in totals.items():
        name = "packed" if pack else "plain "
        print(f"{name}: forward {f / n * 1e3:6.1f} ms  backward {bw / n * 1e3:6.1f} ms a step")
    (pf, pb), (qf, qb) = totals[True], totals[False]
    both = (pf + pb) / (qf + qb)
    print(f"packed/plain: forward {pf / qf:.3f}  backward {pb / qb:.3f}  both {both:.3f}")


if __name__ == "__main__":
    main()
