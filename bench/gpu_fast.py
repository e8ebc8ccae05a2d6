"""Helpers of bench/gpu_train.py for issue 17: peers' extra rows, loss match, step profile.

Each function runs inside one child process of gpu_train.py and returns its JSON figures:

- ``peer_liger``: transformers + peft with Liger's kernels (``apply_liger_kernel_to_qwen2``,
  fused linear cross-entropy included: the peers' "peft + Liger" row);
- ``peer_mixed``: transformers + peft on the length-mixed data, batches of 4 padded to their
  longest sample (what a Trainer-style collator does); counts real (non-pad) tokens;
- ``loss_match``: the first 20 losses of tunesmith's training set-up (``apply_fast_path``,
  ``CausalLMLoss``, bf16 autocast, fp32 adapter) against plain peft (fp32 LoRA, HF loss) on
  the same random batches from the same LoRA initialisation;
- ``profile``: torch.profiler over 2 steps of the fast path after 3 warm-ups; GPU time split
  by kernel kind (the split of shared/peers/profile_step.py) and the top kernels.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def _peft_model(model_dir: str, ckpt: bool = True, dropout: float = 0.0) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": "cuda"}
    )
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF skips checkpointing
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    lora = dict(LORA, lora_dropout=dropout)
    return get_peft_model(model, LoraConfig(**lora, task_type="CAUSAL_LM"))


def _timed_steps(model: Any, batches: list[dict], loss_fn: Any) -> tuple[list[float], float]:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for b in batches:
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times, float(loss)


def peer_liger(model_dir: str, seq: int, steps: int) -> dict:
    """transformers + peft + Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear CE)."""
    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    apply_liger_kernel_to_qwen2()  # before loading: patches the classes
    model = _peft_model(model_dir)
    vocab = model.config.vocab_size
    batches = [
        {"input_ids": torch.randint(0, vocab, (1, seq), device="cuda")} for _ in range(steps)
    ]
    times, loss = _timed_steps(
        model, batches, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss
    )
    return {"impl": "transformers+peft+liger", "times": times, "loss": round(loss, 4)}


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    """Answer lengths in words, alpaca-like: log-normal around ~180, clipped to 20..2000."""
    rng = random.Random(seed)
    return [min(2000, max(20, int(rng.lognormvariate(5.2, 0.9)))) for _ in range(n)]


def peer_mixed(model_dir: str, data: str, steps: int) -> dict:
    """transformers + peft on the mixed data, batches of 4 padded to the longest."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(x) for x in Path(data).read_text().splitlines()]
    ids = []
    for r in records:
        msgs = [{"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]}]  # fmt: skip
        ids.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=False)[:4096])
    batches = []
    for s in range(0, 4 * steps, 4):
        group = ids[s % len(ids) : s % len(ids) + 4]
        width = max(len(x) for x in group)
        inp = torch.full((len(group), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, x in enumerate(group):
            inp[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        labels = inp.masked_fill(mask == 0, -100)
        batch = {"input_ids": inp, "attention_mask": mask, "labels": labels}
        batches.append({k: v.cuda() for k, v in batch.items()})
    model = _peft_model(model_dir)
    times, loss = _timed_steps(model, batches, lambda m, b: m(**b).loss)
    real = [int(b["attention_mask"].sum()) for b in batches]
    padded = [b["input_ids"].numel() for b in batches]
    return {"impl": "transformers+peft (batch 4, padded)", "times": times, "loss": round(loss, 4),
            "real_tokens": real, "padded_tokens": padded}  # fmt: skip


def _tunesmith_model(model_dir: str, fast: str, ckpt: bool = True, dropout: float = 0.0) -> Any:
    """tunesmith's LoRA set-up, as sft() builds it (bf16 base, fp32 adapter, fast path)."""
    import torch
    from peft import get_peft_model

    from tunesmith.model import quant
    from tunesmith.model.fast import FastOptions, apply_fast_path
    from tunesmith.model.load import load_model
    from tunesmith.model.lora import keep_activation_dtype, lora_config
    from tunesmith.model.lora_dropout import share_lora_dropout
    from tunesmith.options import LoraOptions

    model = load_model(Path(model_dir), torch.bfloat16, "sdpa", device="cuda")
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF skips checkpointing
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    cfg = lora_config(LoraOptions(rank=8, alpha=32, dropout=dropout))
    model = get_peft_model(model, cfg)
    quant.set_lora_dtype(model, "float32")
    share_lora_dropout(model)  # as sft() does
    keep_activation_dtype(model)
    opts = FastOptions.parse(fast)
    done = apply_fast_path(model, opts)
    return model, opts, done


def loss_match(model_dir: str, seq: int, steps: int = 20) -> dict:
    """First ``steps`` losses: tunesmith's set-up vs plain peft, same batches, same init, with
    LoRA dropout 0 (same math: the losses must match to bf16 rounding) and 0.05 (masks drawn
    differently: the runs must agree in level, not step by step). Each loop keeps the last
    step's loss alive while the next forward runs (as a plain training loop does): the CUDA
    graphs' capture must work then (session 5 found it failing in this process)."""
    import gc

    import torch
    from transformers import AutoConfig

    g = torch.Generator().manual_seed(1)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    batches = [torch.randint(0, vocab, (1, seq), generator=g).cuda() for _ in range(steps)]
    out: dict = {"impl": "loss match"}
    for p in (0.0, 0.05):
        tag = "" if p == 0 else "_drop"
        torch.manual_seed(0)
        model = _peft_model(model_dir, dropout=p)
        for q in model.parameters():  # peft's recipe for fp32 adapters on a bf16 base
            if q.requires_grad:
                q.data = q.data.float()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
        ref = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ref.append(float(loss))
        del model, opt, loss
        gc.collect()
        torch.cuda.empty_cache()
        out[f"peft{tag}"] = [round(x, 4) for x in ref]
        runs = [("tunesmith", "all")]
        if p == 0:
            runs.append(("tunesmith_eager", "lora,group,kernels,loss"))
        for name, fast in runs:
            ours, graphs = _tunesmith_losses(model_dir, fast, p, batches)
            diff = [abs(a - b) for a, b in zip(ref, ours, strict=True)]
            out |= {f"{name}{tag}": [round(x, 4) for x in ours], f"graphs_{name}{tag}": graphs,
                    f"max_abs_diff_{name}{tag}": round(max(diff), 4),
                    f"mean_{name}{tag}_vs_peft": [round(sum(ours) / len(ours), 4),
                                                  round(sum(ref) / len(ref), 4)]}  # fmt: skip
    out["max_abs_diff"] = max(out["max_abs_diff_tunesmith"], out["max_abs_diff_tunesmith_eager"])
    return out


def _tunesmith_losses(model_dir: str, fast: str, dropout: float, batches: list) -> tuple:
    """tunesmith's training as ``sft`` runs it on CUDA (fused AdamW, bf16 autocast): the
    losses, and what the CUDA graphs did."""
    import gc

    import torch

    from tunesmith.model.lora import CausalLMLoss

    model, opts, _ = _tunesmith_model(model_dir, fast, dropout=dropout)
    module = CausalLMLoss(model, fused_ce=opts.loss)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ours = []
    for ids in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n, _ = module(input_ids=ids, labels=ids)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ours.append(float(loss_sum / n))
    gs = getattr(model.get_base_model().model.layers[0], "_ts_graphs", None)
    graphs = "off" if gs is None else (gs.disabled or f"{len(gs.layers)} layers replayed")
    del model, module, opt, params, loss_sum
    gc.collect()
    torch.cuda.empty_cache()
    return ours, graphs


def profile(model_dir: str, seq: int, fast: str = "all") -> dict:
    """GPU time of one fast-path step, split by kernel kind, and the top 12 kernels."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from tunesmith.model.lora import CausalLMLoss

    model, opts, done = _tunesmith_model(model_dir, fast)
    module = CausalLMLoss(model, fused_ce=opts.loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n, _ = module(input_ids=ids, labels=ids)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 2
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    per: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total / 2
        if us <= 0:
            continue
        name = e.key
        low = name.lower()
        if "gemm" in low or "xmma" in low or "matmul" in low or "cutlass" in low or "sm90" in low:
            kind = "gemm"
        elif "copy" in low or "cast" in low or "to_copy" in low:
            kind = "copy/cast"
        elif "flash" in low or "attention" in low or "fmha" in low:
            kind = "attention"
        elif "triton" in low or "liger" in low or ("_kernel" in low and "elementwise" not in low):
            kind = "triton/other"
        elif "elementwise" in low or "reduce" in low:
            kind = "elementwise"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + us
        per[name] = per.get(name, 0.0) + us
    busy = sum(kinds.values())
    top = sorted(per.items(), key=lambda kv: -kv[1])[:12]
    return {"impl": f"profile fast={fast}", "fast": done, "wall_ms": round(wall * 1e3, 1),
            "gpu_busy_ms": round(busy / 1e3, 1),
            "split": {k: round(100 * v / busy, 1) for k, v in sorted(kinds.items())},
            "top": [[n[:90], round(v / 1e3, 2)] for n, v in top]}  # fmt: skip


def ablation(model_dir: str, seq: int, steps: int = 5) -> dict:
    """One model, the fast path's parts switched on one after another, gradient checkpointing
    on: wall time of forward and backward per step, and the peak, after each stage."""
    import torch

    from tunesmith.model.fast import _apply_kernels
    from tunesmith.model.fast.lora_fused import patch_lora_layers
    from tunesmith.model.lora import CausalLMLoss

    model, _, _ = _tunesmith_model(model_dir, "none")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (1, seq), device="cuda")
    stages = {}
    for stage in ("none", "+lora", "+loss", "+kernels", "+kernels -ckpt"):
        if stage == "+lora":
            patch_lora_layers(model)
        if stage == "+kernels":
            _apply_kernels(model)
        if stage == "+kernels -ckpt":
            model.get_base_model().gradient_checkpointing_disable()
        module = CausalLMLoss(model, fused_ce=stage != "none" and stage != "+lora")
        fwd, bwd, issue = [], [], []
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_sum, n, _ = module(input_ids=ids, labels=ids)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()  # backward issued: CPU time, before waiting for the GPU
            torch.cuda.synchronize()
            if i >= 2:
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)
                issue.append(t2 - t1)
        f, b = sorted(fwd)[len(fwd) // 2], sorted(bwd)[len(bwd) // 2]
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        stages[stage] = {"fwd_ms": round(f * 1e3, 1), "bwd_opt_ms": round(b * 1e3, 1),
                         "bwd_cpu_issue_ms": round(sorted(issue)[len(issue) // 2] * 1e3, 1),
                         "tok_s": round(seq / (f + b)), "peak_gib": peak}  # fmt: skip
    return {"impl": "ablation (in-process, grad-ckpt)", "stages": stages}
