"""Decode speed of the ``pt`` backend: batch-1 greedy tokens/s and time to first token.

Variants, all in one process on the same weights and the same prompt ids:

  hf_generate           plain ``model.generate`` (dynamic cache): the baseline
  tunesmith_default     tunesmith's engine, default path
  tunesmith_fast        tunesmith's engine, ``--fast_decode true`` (static cache; compiled
                        decode step on CUDA): its own decode loop, infer/decode.py
  lora_unmerged_*       the same two, with a random LoRA adapter (r16, all-linear) as a peft
                        wrapper on top, as ``infer --adapters CKPT`` runs it
  lora_merged_*         the same two after ``merge_and_unload`` (``infer --merge_lora true``)
  tunesmith_fast_cpu_compiled   (``--cpu-compile``) the fast path with torch.compile forced on
                        CPU, to measure whether it pays there
  llamacpp_f16, _q8_0   (``--llamacpp f16,q8_0``) the llamacpp backend on the model's GGUF
                        export (bench/llamacpp_rows.py), then chat time-to-first-text rows
                        of both backends; ``--batch N`` adds batch-inference rows of both
                        (records/s and answer tokens/s over N chat questions)

same_tokens_as_default: the greedy ids equal those of the same weights' default path (the
last non-fast variant before it).

Every variant decodes exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``)
from a ``--prompt-len``-token prompt, after ``--warmup`` unmeasured runs (the compile happens
there); the median of ``--repeat`` runs is printed, one JSON line per variant. tokens/s is the
decode rate after the first token ((N-1) / time from first to last token); ttft_s is the time
from the call to the first new token (prefill). The roofline is the batch-1 bound of a decode
step that reads every weight once: bandwidth / weight bytes read per token.

Needs only torch, transformers and peft (and this repository's ``src/``), so it runs on a GPU
machine from a checkout:

  # CPU, the demo model (bench/RESULTS.md "Decode speed")
  python bench/decode_bench.py --model demo --new-tokens 64
  # CPU, pt beside llamacpp (bench/RESULTS.md "llamacpp backend")
  python bench/decode_bench.py --model demo --no-lora --llamacpp f16,q8_0 --batch 8
  # GPU: a Qwen2.5-7B-shaped model with random bf16 weights, made once, then measured
  python bench/decode_bench.py --make-random 7b /tmp/qwen7b-random [--tokenizer TOKDIR]
  python bench/decode_bench.py --model /tmp/qwen7b-random --new-tokens 256 --bandwidth-tbs 3.35
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Qwen2.5 shapes (config.json of the released models).
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT = (
    "The quick brown fox jumps over the lazy dog. Machine learning models are trained on large "
    "amounts of text data, and fine-tuning adapts a pretrained language model to a new task. "
)


def make_random(shape: str, out: Path, tokenizer: str | None, device: str) -> None:
    """Save a Qwen2.5-shaped model with random bf16 weights (and a tokenizer, when given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    cfg = Qwen2Config(
        **SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        use_sliding_window=False, bos_token_id=151643, eos_token_id=151645,
    )  # fmt: skip
    with torch.device(device):  # initialising 7B on the GPU takes seconds, on CPU minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    if tokenizer:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved a random {shape} model ({n / 1e9:.2f} B parameters, bf16) to {out}")


def prompt_ids(model_dir: Path, tokenizer: str | None, length: int, vocab: int) -> torch.Tensor:
    """Exactly ``length`` prompt ids: English text through the tokenizer, else random ids."""
    from transformers import AutoTokenizer

    for path in (tokenizer, model_dir):
        if path is None:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            continue
        ids = tok(TEXT * (1 + length // 20), add_special_tokens=False)["input_ids"][:length]
        return torch.tensor([ids])
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, min(vocab, 100_000), (1, length), generator=gen)


class Clock:
    """A streamer that timestamps the prompt (first call) and every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        value.cpu()  # waits for the device, so the stamp is when the token exists
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weight_bytes(model: Any) -> int:
    """Bytes of weights a decode step reads: every parameter once, but of an input embedding
    table only the looked-up row (when it is not also the output layer)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (0: nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_bandwidth(device: torch.device) -> float:
    """Copy bandwidth in TB/s (read + write of a 512 MiB tensor), for a CPU roofline."""
    x = torch.empty(1 << 27, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        y.copy_(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best / 1e12


def time_one(call: Any) -> tuple[float, float, torch.Tensor]:
    """(ttft_s, decode tokens/s, new ids) of one generate call."""
    clock = Clock()
    start = time.perf_counter()
    out = call(clock)
    stamps = clock.times[1:]  # [0] is the prompt
    n = len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return stamps[0] - start, decode, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--make-random", nargs=2, metavar=("SHAPE", "DIR"), help="0.5b, 1.5b or 7b")
    ap.add_argument("--model", help="model directory, or 'demo'")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's, else ids)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--dtype", default="auto", choices=("auto", *DTYPES),
        help="auto: tunesmith's choice (bf16 on GPU and on CPUs with native bf16, else fp32)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 256 GPU, 64 CPU")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=None, help="default: 5 GPU, 2 CPU")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA variants")
    ap.add_argument("--cpu-compile", action="store_true", help="also the compiled CPU variant")
    ap.add_argument(
        "--bandwidth-tbs", type=float, default=None,
        help="memory bandwidth for the roofline (default: 3.0 on CUDA (H100), measured on CPU)",
    )  # fmt: skip
    ap.add_argument("--llamacpp", help="also these GGUF types on llama.cpp, e.g. f16,q8_0")
    ap.add_argument("--batch", type=int, default=0, help="batch-inference rows over N questions")
    ap.add_argument(
        "--batch-only", action="store_true", help="only the --batch rows (no decode rows)"
    )  # fmt: skip
    ap.add_argument("--out", help="also append the JSON lines to this file")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if a.make_random:
        make_random(a.make_random[0], Path(a.make_random[1]), a.tokenizer, device.type)
        return
    if not a.model:
        ap.error("--model DIR (or --make-random SHAPE DIR)")
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.engine import Engine, generate_tokens
    from tunesmith.model.load import resolve_dtype, resolve_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = resolve_model(a.model) if a.model.startswith("demo") else Path(a.model)
    dtype = resolve_dtype("auto", device.type) if a.dtype == "auto" else DTYPES[a.dtype]
    new = a.new_tokens or (256 if cuda else 64)
    repeat = a.repeat or (5 if cuda else 2)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", device_map=device
    ).eval()
    ids = prompt_ids(model_dir, a.tokenizer, a.prompt_len, model.config.vocab_size).to(device)
    mask = torch.ones_like(ids)
    bw = a.bandwidth_tbs if a.bandwidth_tbs else (3.0 if cuda else measure_bandwidth(device))
    gen = {
        "max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "temperature": None,
        "top_p": None, "top_k": None, "pad_token_id": 0,  # no row ends early: no padding
    }  # fmt: skip
    info = {
        "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": ids.shape[1], "new_tokens": new, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "bandwidth_tbs": round(bw, 3),
    }  # fmt: skip
    baseline: dict[str, Any] = {}
    default_tokens: list[int] = []

    def report(variant: str, m: Any, call: Any) -> None:
        for _ in range(a.warmup):
            call(Clock())
        runs = [time_one(call) for _ in range(repeat)]
        tps = statistics.median(r[1] for r in runs)
        ttft = statistics.median(r[0] for r in runs)
        tokens = runs[-1][2].reshape(-1)[-new:].tolist()
        roof = bw * 1e12 / weight_bytes(m)
        if not baseline:
            baseline.update(tps=tps, tokens=tokens)
        if not variant.endswith("_fast") and "compiled" not in variant:
            default_tokens[:] = tokens  # what the fast path of the same weights must produce
        row = {
            "variant": variant, "tokens_per_s": round(tps, 2), "ttft_s": round(ttft, 4),
            "ratio_vs_baseline": round(tps / baseline["tps"], 3),
            "same_tokens_as_default": tokens == default_tokens,
            "weight_gb": round(weight_bytes(m) / 1e9, 3), "roofline_tokens_per_s": round(roof, 1),
            "pct_of_roofline": round(100 * tps / roof, 1),
            "compiled_graphs": compiled_graphs(), **info,
        }  # fmt: skip
        emit(row)

    def emit(row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def engine_variants(prefix: str, m: Any) -> None:
        for fast in (False, True):
            eng = Engine(m, None, None, device, fast)
            name = f"{prefix}_{'fast' if fast else 'default'}"
            report(name, m, lambda clock, e=eng: generate_tokens(e, ids, mask, gen, clock))

    def reset_compile(m: Any) -> None:
        """Forget compiled graphs when the module tree changes (LoRA wrapped or merged)."""
        torch._dynamo.reset()
        for mod in m.modules():
            mod.__dict__.pop("_compiled_call", None)

    if a.batch_only:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from llamacpp_rows import batch_rows

        types = a.llamacpp.split(",") if a.llamacpp else []
        for row in batch_rows(a.model, model_dir, types, a.batch, new, dtype):
            emit(row | {"device": cpu_name(), "threads": torch.get_num_threads()})
        return
    report("hf_generate", model, lambda clock: model.generate(ids, attention_mask=mask, **gen,
                                                              streamer=clock))  # fmt: skip
    engine_variants("tunesmith", model)
    if a.cpu_compile and not cuda:
        from transformers import CompileConfig

        cc = CompileConfig(mode="default")
        cc._compile_all_devices = True
        eng = Engine(model, None, None, device, True)
        kw = gen | {"disable_compile": False, "compile_config": cc}
        report(
            "tunesmith_fast_cpu_compiled", model,
            lambda clock: generate_tokens(eng, ids, mask, kw, clock),
        )  # fmt: skip
    if a.llamacpp or a.batch:
        pt_run = (model_dir, dtype, new)
        llamacpp_variants(a, pt_run, ids[0].tolist(), baseline, default_tokens, emit)
    if a.no_lora:
        return
    from peft import LoraConfig, get_peft_model

    reset_compile(model)
    cfg = LoraConfig(
        r=a.lora_rank, lora_alpha=2 * a.lora_rank, target_modules="all-linear",
        init_lora_weights=False,  # random B: the adapter really changes the outputs
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg).eval()
    engine_variants("lora_unmerged", peft_model)
    reset_compile(peft_model)
    merged = peft_model.merge_and_unload()
    engine_variants("lora_merged", merged)


def llamacpp_variants(
    a: Any, pt_run: tuple, ids: list[int], baseline: dict, pt_tokens: list, emit: Any
) -> None:
    """The llamacpp rows (and batch rows) beside the pt rows just measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp_rows import batch_rows, chat_ttft_rows, decode_rows

    model_dir, dtype, new = pt_run
    types = a.llamacpp.split(",") if a.llamacpp else []
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info = {"device": cpu_name(), "avx512_bf16": "avx512_bf16" in flags, "prompt_len": len(ids),
            "new_tokens": new, "llama_cpp": __import__("llama_cpp").__version__}  # fmt: skip

    def report(variant: str, tps: float, ttft: float, tokens: list[int], extra: dict) -> None:
        pairs = enumerate(zip(tokens, pt_tokens, strict=False))
        same = next((i for i, (x, y) in pairs if x != y), min(len(tokens), len(pt_tokens)))
        emit({"variant": variant, "tokens_per_s": round(tps, 2), "ttft_s": round(ttft, 4),
              "ratio_vs_baseline": round(tps / baseline["tps"], 3),
              "same_tokens_as_default": tokens == pt_tokens, "same_leading_tokens": same,
              **extra, **info})  # fmt: skip

    decode_rows(a.model, types, ids, new, a.warmup, a.repeat or 2, report)
    if types:
        for row in chat_ttft_rows(a.model, model_dir, types, dtype, new):
            emit(row | info)
    if a.batch:
        for row in batch_rows(a.model, model_dir, types, a.batch, new, dtype):
            emit(row | info)


if __name__ == "__main__":
    main()
