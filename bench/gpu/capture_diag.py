"""Issue 17, session 5: why does the CUDA-graph capture fail in the loss-match process?

One fresh process per case: optionally train a plain peft model first (as gpu_fast.loss_match
does), then tunesmith's fast path with graphs on a 4-layer 7B-width model; prints whether the
capture failed. Usage (CUDA): python3 bench/gpu/capture_diag.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = ("fresh", "peft_ckpt_inputgrads", "peft_ckpt", "peft_plain", "peft_ckpt_inputgrads_gc")


def build(kind: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.config.use_cache = False
    m.train()
    if "ckpt" in kind:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "inputgrads" in kind:
        m.enable_input_require_grads()
    return get_peft_model(m, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                        target_modules="all-linear"))  # fmt: skip


def one(case: str) -> dict:
    import gc

    import torch

    from tunesmith.model.fast import FastOptions, apply_fast_path
    from tunesmith.model.lora import CausalLMLoss

    ids = [torch.randint(0, 152064, (1, 1024)).cuda() for _ in range(4)]
    if case != "fresh":
        peft = build(case)
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
        for x in ids[:2]:
            peft(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
        if case.endswith("_gc"):
            del peft, opt
            gc.collect()
            torch.cuda.empty_cache()
    model = build("ckpt")
    apply_fast_path(model, FastOptions(embed=False))
    module = CausalLMLoss(model, fused_ce=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            fused=True)  # fmt: skip
    for x in ids:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n, _ = module(input_ids=x, labels=x)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    gs = model.get_base_model().model.layers[0]._ts_graphs
    return {"case": case, "captured": len(gs.layers), "disabled": gs.disabled}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(one(sys.argv[1])), flush=True)
    else:
        for c in CASES:
            p = subprocess.run([sys.executable, __file__, c], capture_output=True, text=True,
                               env=dict(os.environ), timeout=120, check=False)  # fmt: skip
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            print(lines[-1] if lines else json.dumps({"case": c, "error": p.stderr[-600:]}))
