"""A ``--cpu_fast`` part on and off in ONE process, step by step on the same batches.

Whole-run rows of ``bench/cpu_sft.py`` run minutes apart, and this machine's speed drifts by
10-20 % between minutes, so a 10 % effect cannot be read from two of them. Here the run is
built exactly as ``tunesmith sft`` builds it (``--cpu_fast auto``), one part is switched at run
time (``--switch pack``: the grouped LoRA layers between prepacked and plain base weights;
``--switch layers``: the fused decoder-layer functions against HF's forwards; ``--switch
head``: the prepacked LM head against ``F.linear``), and every batch is run forward and
backward with both, alternating (A B B A ...), timing forward and backward apart. The
optimizer does not step (the weights stay the same for both).

Usage: python bench/cpu_pack_ab.py [--switch pack|layers|head] [--flags "--torch_dtype bfloat16"]
                                   [--batches 30] [--rounds 2]
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
    ap.add_argument("--switch", default="pack", choices=("pack", "layers", "head"))
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
    attr = {"pack": "_tunesmith_group", "layers": "_tunesmith_fused", "head": "_tunesmith_head"}
    attr = attr[opts.switch]
    groups = {id(getattr(m, attr)): getattr(m, attr) for m in run.loss_module.modules()
              if hasattr(m, attr)}.values()  # fmt: skip
    assert groups, f"nothing to switch: --cpu_fast has no {opts.switch} in this run"
    it = iter(run.loader)
    batches = [next(it) for _ in range(opts.batches)]
    tokens = sum(b["input_ids"].numel() for b in batches)

    def step(batch: dict, pack: bool) -> tuple[float, float]:
        for g in groups:
            if opts.switch == "pack":
                g.pack = pack
            else:
                g.enabled = pack
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
    print(f"{opts.switch}: {len(groups)} switches, {n} steps a mode "
          f"({tokens / len(batches):.0f} tokens a step)")  # fmt: skip
    for pack, (f, bw) in totals.items():
        name = "on " if pack else "off"
        print(f"{name}: forward {f / n * 1e3:6.1f} ms  backward {bw / n * 1e3:6.1f} ms a step")
    (pf, pb), (qf, qb) = totals[True], totals[False]
    both = (pf + pb) / (qf + qb)
    print(f"on/off: forward {pf / qf:.3f}  backward {pb / qb:.3f}  both {both:.3f}")


if __name__ == "__main__":
    main()
