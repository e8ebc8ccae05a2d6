"""``tunesmith estimate``: peak GPU memory and tokens/s of an ``sft`` run, before any download.

The model's shape comes from its ``config.json`` (a local directory, or a hub id: only that
file is fetched) or from shape flags. Memory is counted term by term for tunesmith's own GPU
path (bf16 or 4-bit base, fp32 LoRA weights with AdamW, gradient checkpointing of each decoder
layer's input, the chunked cross-entropy of ``model/fast/loss.py``); the per-layer working set
of the backward, the matmul efficiency and the host time per layer are constants measured on
an H200 (bench/gpu_train.py; bench/RESULTS.md compares every harness row with this estimate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import arg
from tunesmith.utils import UserError

GIB = 2**30
# Measured constants (bench/RESULTS.md, "issue 17", harness call 4): the backward of one
# checkpointed decoder layer holds about MLP_WORKING (seq x intermediate) bf16 tensors at once
# beside its attention tensors. A step's time is its matmul FLOPs at MATMUL_EFF of the H200's
# measured 790 TFLOP/s plus HOST_S host time per layer and pass (forward, recompute, backward):
# at seq 2048 the step is bound by issuing kernels, at 8192 by the matmuls; the two constants
# are fitted to those two rows of `tunesmith sft` (7,728 and 10,370 tokens/s).
MLP_WORKING = 5.0
MATMUL_PEAK = 790e12
MATMUL_EFF = 0.72
HOST_S = 1.28e-3
QLORA_SLOWDOWN = 1.30  # 4-bit: each weight is dequantized in forward, recompute and backward
# LoRA rows of up to GRAPH_TOKENS tokens replay each layer as CUDA graphs (model/fast/graphs.py):
# the host time per layer and pass drops to HOST_S_GRAPHS, and the graphs' pool keeps one
# layer's backward working set reserved (GRAPH_SCRATCH of it without recompute); fitted to the
# session-5 harness rows (bench/RESULTS.md, issue 17).
GRAPH_TOKENS = 4096  # model/fast/graphs.py's MAX_TOKENS
HOST_S_GRAPHS = 0.45e-3
QLORA_SLOWDOWN_GRAPHS = 1.077
GRAPH_SCRATCH_NOCKPT = 0.3
CE_CHUNK_ELEMENTS = 2**25  # model/fast/loss.py's CHUNK_ELEMENTS


@dataclass
class EstimateArgs:
    """Flags of ``tunesmith estimate`` (names as ``tunesmith sft``'s)."""

    model: str | None = arg(None, "local model directory or hub id (only config.json is read)")
    hidden_size: int = arg(0, "shape instead of --model: hidden size")
    intermediate_size: int = arg(0, "shape: MLP width")
    num_hidden_layers: int = arg(0, "shape: decoder layers")
    num_attention_heads: int = arg(0, "shape: attention heads")
    num_key_value_heads: int = arg(0, "shape: key/value heads (0: as attention heads)")
    vocab_size: int = arg(0, "shape: vocabulary size")
    tie_word_embeddings: bool = arg(False, "shape: LM head shares the embedding matrix")
    train_type: str = arg("lora", "lora or full", choices=("lora", "full"))
    quantization_bit: int = arg(0, "4: QLoRA (nf4, double quantization); 0: bf16 base")
    max_length: int = arg(2048, "tokens per sample (packed or padded length)")
    per_device_train_batch_size: int = arg(1, "samples per micro-batch")
    gradient_checkpointing: bool = arg(True, "recompute each layer in backward")
    lora_rank: int = arg(8, "LoRA rank r (all linear layers)")


@dataclass
class Shape:
    """The dimensions of a decoder-only transformer that set its memory and FLOPs."""

    hidden: int
    """Hidden size."""
    intermediate: int
    """MLP width."""
    layers: int
    """Decoder layers."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """Key/value heads."""
    vocab: int
    """Vocabulary size."""
    tied: bool
    """Whether the LM head is the embedding matrix."""

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (q, k, v, o, gate, up, down)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def params(self) -> tuple[int, int]:
        """(parameters in the decoder layers' linear layers, all other parameters)."""
        linear = self.layers * sum(a * b for a, b in self.linear_shapes())
        other = self.vocab * self.hidden * (1 if self.tied else 2)
        other += self.layers * (2 * self.hidden + self.hidden + 2 * self.kv_dim) + self.hidden
        return linear, other


def load_shape(args: EstimateArgs) -> Shape:
    """The shape from ``--model``'s config.json (local or hub), else from the shape flags."""
    if args.model:
        path = Path(args.model)
        if path.is_dir():
            config_file = path / "config.json"
            if not config_file.is_file():
                raise UserError(f"{path} has no config.json")
        else:
            from huggingface_hub import hf_hub_download

            try:
                config_file = Path(hf_hub_download(args.model, "config.json"))
            except Exception as e:  # network, unknown repo, gated repo: one sentence
                raise UserError(f"cannot read config.json of {args.model}: {e}") from None
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        return Shape(
            hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)),
        )  # fmt: skip
    need = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [f"--{n}" for n in [*need, "vocab_size"] if getattr(args, n) <= 0]
    if missing:
        raise UserError(f"give --model, or the shape flags ({', '.join(missing)} missing)")
    return Shape(
        hidden=args.hidden_size, intermediate=args.intermediate_size,
        layers=args.num_hidden_layers, heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads or args.num_attention_heads,
        vocab=args.vocab_size, tied=args.tie_word_embeddings,
    )  # fmt: skip


def estimate(shape: Shape, args: EstimateArgs) -> dict[str, float]:
    """Memory terms (GiB), their sum ``peak_gib``, and ``tokens_per_s`` on an H200."""
    if args.train_type == "full" and args.quantization_bit:
        raise UserError("--quantization_bit trains LoRA on a frozen base; not with full")
    if args.quantization_bit not in (0, 4):
        raise UserError("estimate knows --quantization_bit 0 and 4")
    tokens = args.max_length * args.per_device_train_batch_size
    h, i = shape.hidden, shape.intermediate
    linear, other = shape.params()
    terms: dict[str, float] = {}
    if args.train_type == "full":  # fp32 master weights, grads and AdamW state
        terms["weights"] = 16 * (linear + other) / GIB
    else:
        # nf4: 4 bits + one 8-bit absmax a 64-block + fp32 second-level constants a 256 blocks.
        per_linear = 0.5 + 1 / 64 + 4 / (64 * 256) if args.quantization_bit == 4 else 2.0
        # The frozen input embedding of an untied model lives in host memory (fast/embed.py).
        host = 0 if shape.tied else shape.vocab * shape.hidden
        terms["weights"] = (per_linear * linear + 2 * (other - host)) / GIB
        lora = shape.layers * args.lora_rank * sum(a + b for a, b in shape.linear_shapes())
        terms["lora_and_adamw"] = 16 * lora / GIB  # fp32 weight, grad, two moments
    # Bytes a token keeps per layer without recompute, with the fast path's Liger kernels (the
    # norms keep their bf16 input only; the SwiGLU keeps gate and up, down_proj its input):
    # fitted to the H200's no-checkpointing row (23.43 GiB).
    per_token_layer = 2 * (5 * h + 2 * shape.kv_dim + 3 * i)
    working = 2 * tokens * (MLP_WORKING * i + 6 * h)  # one layer's backward
    graphs = args.train_type == "lora" and tokens <= GRAPH_TOKENS
    if args.gradient_checkpointing:
        terms["checkpoints"] = 2 * tokens * h * (shape.layers + 1) / GIB
        terms["layer_backward"] = working / GIB
    else:
        terms["activations"] = (per_token_layer * tokens * shape.layers + working) / GIB
    if graphs:
        scratch = 1.0 if args.gradient_checkpointing else GRAPH_SCRATCH_NOCKPT
        terms["graph_pool"] = scratch * working / GIB
    chunk = max(64, CE_CHUNK_ELEMENTS // shape.vocab // 64 * 64)
    terms["loss"] = (6 * min(chunk, tokens) * shape.vocab + 4 * tokens * h) / GIB
    flops = 2 * (linear + shape.vocab * h) * tokens  # forward matmuls
    flops += 2 * shape.layers * 2 * args.max_length * h * tokens / 2  # causal attention
    factor = 3 if args.gradient_checkpointing else 2  # forward, input grads, (recompute)
    if args.train_type == "full":
        factor += 1  # weight gradients
    passes = 3 if args.gradient_checkpointing else 2
    host = HOST_S_GRAPHS if graphs else HOST_S
    seconds = factor * flops / (MATMUL_EFF * MATMUL_PEAK) + host * shape.layers * passes
    if args.quantization_bit == 4:
        seconds *= QLORA_SLOWDOWN_GRAPHS if graphs else QLORA_SLOWDOWN
    out = {k: round(v, 3) for k, v in terms.items()}
    out["peak_gib"] = round(sum(terms.values()), 2)
    out["tokens_per_s"] = round(tokens / seconds)
    return out


def render(shape: Shape, args: EstimateArgs, est: dict[str, float]) -> str:
    """The estimate as a few aligned lines."""
    linear, other = shape.params()
    what = "QLoRA 4-bit" if args.quantization_bit == 4 else args.train_type
    lines = [
        f"model: {(linear + other) / 1e9:.2f}B parameters, {shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}; {what}, {args.max_length} tokens x "
        f"{args.per_device_train_batch_size}, checkpointing {args.gradient_checkpointing}",
    ]
    for k, v in est.items():
        if k not in ("peak_gib", "tokens_per_s"):
            lines.append(f"  {k:<16} {v:8.2f} GiB")
    lines.append(f"  {'peak':<16} {est['peak_gib']:8.2f} GiB (tunesmith sft, fast path)")
    lines.append(f"  tokens/s on one H200: about {est['tokens_per_s']:,}")
    return "\n".join(lines)
