"""The tunesmith and plain-peft rows of bench/gpu_train.py, each run in its own process.

- ``run_tunesmith``: ``tunesmith sft`` as a user runs it (flags per row in ``TUNESMITH_FLAGS``);
- ``run_peer``: plain transformers + peft with gradient checkpointing (bf16 or a 4-bit base
  prepared with ``prepare_model_for_kbit_training``), the peers' baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
TUNESMITH_FLAGS = {
    "lora_nofast": ["--fast", "none"],
    "lora_all": ["--fast", "all"],  # + CUDA graphs and the host embedding (issue 17, session 5)
    "lora_all_nockpt": ["--fast", "all", "--gradient_checkpointing", "false"],
    "lora_graphs": ["--fast", "lora,group,kernels,loss,graphs"],
    "lora_embed": ["--fast", "lora,group,kernels,loss,embed"],
    "qlora_all": ["--fast", "all", "--quantization_bit", "4", "--bnb_4bit_quant_type", "nf4"],
    "lora_noliger": ["--fast", "lora,group,loss"],
    "lora_nockpt": ["--gradient_checkpointing", "false"],
    "lora_mixed": ["--packing", "true"],
    "qlora": ["--quantization_bit", "4", "--bnb_4bit_quant_type", "nf4"],
    "qlora_drop": ["--quantization_bit", "4", "--bnb_4bit_quant_type", "nf4"],
}
DROPOUT_RUNS = ("lora_drop", "peft_drop", "qlora_drop")  # --lora_dropout 0.05 (ms-swift's)
DROPOUT = 0.05


def median_after_warmup(times: list[float]) -> float:
    """Median step time, leaving out the first two steps (allocator and kernel warm-up)."""
    return round(statistics.median(times[2:] if len(times) > 2 else times), 4)


def run_tunesmith(run: str, model_dir: str, data: str, seq: int, steps: int, work: str) -> dict:
    """``tunesmith sft`` as a user runs it; figures from its logging.jsonl."""
    from tunesmith.cli import parse_args
    from tunesmith.config import SftArgs
    from tunesmith.train.sft import sft
    from tunesmith.utils import setup_logging

    setup_logging()
    os.environ["TUNESMITH_CACHE"] = str(Path(work) / "cache")  # tokenized data
    out = Path(work) / "runs" / f"{run}-{Path(model_dir).name}"
    argv = [
        "--model", model_dir, "--dataset", data, "--train_type", "lora",
        "--torch_dtype", "bfloat16", "--max_length", str(seq), "--truncation_strategy", "right",
        "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "100000",
        "--save_only_model", "true", "--report_to", "none", "--output_dir", str(out),
        "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0",
        "--target_modules", "all-linear", "--per_device_train_batch_size", "1",
        "--gradient_checkpointing", "true", "--learning_rate", "1e-4",
    ]  # fmt: skip
    argv += TUNESMITH_FLAGS.get(run, [])
    if run == "lora_mixed":  # packed rows of up to 4096 real tokens, no padding
        argv[argv.index("--max_length") + 1] = "4096"
    if run in DROPOUT_RUNS:
        argv[argv.index("--lora_dropout") + 1] = str(DROPOUT)
    run_dir = sft(parse_args(SftArgs, "tunesmith sft", "bench", argv))
    log = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    log = [r for r in log if "loss" in r]
    elapsed = [r["elapsed_s"] for r in log]
    step_s = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    return {
        "impl": "tunesmith",
        "argv_extra": TUNESMITH_FLAGS.get(run, []),
        "step_s": median_after_warmup(step_s),
        "log_tok_s": round(statistics.median(r["tokens_per_s"] for r in log[2:] or log), 1),
        "peak_gib": round(max(r["memory_gb"] for r in log), 2),
        "loss": log[-1]["loss"],
    }


def run_peer(run: str, model_dir: str, seq: int, steps: int, device: str) -> dict:
    """Plain transformers + peft: the logic of shared/peers/lora_baseline.py ``peft``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ckpt = {"use_reentrant": False}
    if run in ("peft", "peft_nockpt", "peft_drop"):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        if run != "peft_nockpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
            model.enable_input_require_grads()
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, quantization_config=bnb, device_map={"": device},
            attn_implementation="sdpa",
        )  # fmt: skip
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=ckpt)
    model.config.use_cache = False
    lora = dict(LORA, lora_dropout=DROPOUT) if run in DROPOUT_RUNS else LORA
    model = get_peft_model(model, LoraConfig(**lora, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {
        "impl": "transformers+peft" + (f" dropout {DROPOUT}" if run in DROPOUT_RUNS else ""),
        "step_s": median_after_warmup(times),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if cuda else -1, 2),
        "loss": round(loss.item(), 4),
    }
