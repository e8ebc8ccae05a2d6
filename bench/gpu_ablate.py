"""Where a fast-path training step's time goes, one variant per fresh process (issue 17).

Each variant builds the Qwen2.5-7B shape from its config straight on the GPU (random bf16
weights, no disk), wraps it with peft LoRA r8 all-linear (fp32 adapter, as ``tunesmith sft``
does), switches on the parts named, and times 5 steps after 2 warm-ups: forward wall, backward
+ optimizer wall, the CPU time to *issue* the backward (before waiting for the GPU), peak
memory; then torch.profiler over one step: GPU busy time, kernel count and the split by kind.
When CPU issue time equals the backward's wall time and GPU busy is far below it, the step is
launch-bound (the GPU waits for Python).

Variants (``+``-joined; ``ckpt`` default on): ``none`` (peft layers under bf16 autocast),
``lora``, ``group``, ``kernels``, ``loss``, ``graphs`` (FastOptions parts), ``embed`` (the
input embedding in host memory), ``v1`` (the previous fused
function, bench/gpu/lora_fused_v1.py, instead of the current one), ``nockpt``, ``compile``
(``torch.compile`` of every decoder layer).

Usage: python3 bench/gpu_ablate.py [--seq 2048] VARIANT ...   (needs CUDA; prints a table)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)  # fmt: skip


def build(parts: set[str]) -> tuple:
    """The 7B-shape peft model with the named fast-path parts; (model, loss module)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tunesmith.model import quant
    from tunesmith.model.fast import FastOptions, apply_fast_path
    from tunesmith.model.lora import CausalLMLoss, keep_activation_dtype, lora_config
    from tunesmith.options import LoraOptions

    cfg = Qwen2Config(**SHAPE, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    model.train()
    if "nockpt" not in parts:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(LoraOptions(rank=8, alpha=32, dropout=0.0)))
    quant.set_lora_dtype(model, "float32")
    keep_activation_dtype(model)
    opts = FastOptions(lora="lora" in parts and "v1" not in parts, group="group" in parts,
                       kernels="kernels" in parts, loss="loss" in parts,
                       graphs="graphs" in parts)  # fmt: skip
    done = apply_fast_path(model, opts)
    if "embed" in parts:
        from tunesmith.model.fast.embed import offload_embedding

        done.append(offload_embedding(model))
    if "v1" in parts:
        sys.path.insert(0, str(ROOT / "bench" / "gpu"))
        import lora_fused_v1

        patched, total = lora_fused_v1.patch_lora_layers(model)
        done.append(f"v1 fused LoRA on {patched}/{total} layers")
    if "compile" in parts:
        for layer in model.get_base_model().model.layers:
            layer.compile()
        done.append("torch.compile per decoder layer")
    return model, CausalLMLoss(model, fused_ce=opts.loss), done


def measure(parts: set[str], seq: int, steps: int = 5) -> dict:
    """Step timings and one profiled step of one variant."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t_build = time.perf_counter()
    model, module, done = build(parts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)  # fmt: skip
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), device="cuda")

    losses: list[float] = []

    def step() -> tuple[float, float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n, _ = module(input_ids=ids, labels=ids)
        losses.append(float(loss_sum / n))  # the step's own sync
        t1 = time.perf_counter()
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1, t2 - t1

    t_first = time.perf_counter()
    step()
    first_s = time.perf_counter() - t_first  # includes compilation, if any
    step()
    torch.cuda.reset_peak_memory_stats()
    rows = sorted((step() for _ in range(steps)), key=lambda r: r[0] + r[1])
    fwd, bwd, issue = rows[len(rows) // 2]
    from tunesmith.model.fast.graphs import SLACK

    # CUDA graphs' replays allocate nothing: their pool's scratch is counted on top.
    peak = (torch.cuda.max_memory_allocated() + SLACK[0]) / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    busy = count = 0.0
    kinds: dict[str, float] = {}
    per: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        busy += us
        count += e.count
        low = e.key.lower()
        kind = ("gemm" if any(k in low for k in ("gemm", "xmma", "cutlass", "sm90", "matmul"))
                else "attention" if any(k in low for k in ("flash", "fmha", "attention"))
                else "copy/cast" if "copy" in low or "cast" in low
                else "elementwise" if "elementwise" in low or "reduce" in low
                else "other")  # fmt: skip
        kinds[kind] = kinds.get(kind, 0.0) + us
        per[e.key[:80]] = (us / 1e3, e.count)
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:10]
    return {"variant": "+".join(sorted(parts)), "done": done,
            "build_s": round(t_first - t_build, 1), "first_step_s": round(first_s, 1),
            "fwd_ms": round(fwd * 1e3, 1), "bwd_ms": round(bwd * 1e3, 1),
            "bwd_issue_ms": round(issue * 1e3, 1), "tok_s": round(seq / (fwd + bwd)),
            "peak_gib": round(peak, 2), "graph_slack_gib": round(SLACK[0] / 2**30, 3),
            "reserved_gib": round(reserved, 2), "losses": [round(x, 5) for x in losses],
            "gpu_busy_ms": round(busy / 1e3, 1),
            "kernels": int(count),
            "split_ms": {k: round(v / 1e3, 1) for k, v in sorted(kinds.items())},
            "top": [[k, round(ms, 1), n] for k, (ms, n) in top]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(set(a.variants[0].split("+")), a.seq)), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))  # fmt: skip
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for v in a.variants:
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", "--seq", str(a.seq), v], env=env,
                capture_output=True, text=True, timeout=a.timeout, check=False,
            )  # fmt: skip
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"variant": v, "error": proc.stderr[-800:]}
        except subprocess.TimeoutExpired:
            r = {"variant": v, "error": f"timed out after {a.timeout}s"}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(out / "gpu_ablate.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
    print(f"{'variant':<30} fwd_ms bwd_ms issue  tok/s  peak  gpu_ms kernels")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<30} error {r['error'][-300:]}")
            continue
        cols = ("fwd_ms", "bwd_ms", "bwd_issue_ms", "tok_s", "peak_gib", "gpu_busy_ms", "kernels")
        print(f"{r['variant']:<30} " + " ".join(f"{r[c]:<6}" for c in cols))


if __name__ == "__main__":
    main()
