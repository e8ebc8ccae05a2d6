"""Typed options for the layers below ``cli``: small groups built once from a command's flags.

The flag dataclasses of ``tunesmith.config`` are what the command line parses into; the layers
below take only the group they use (data, template, model, LoRA, quantization, optimizer),
so a reader sees at a function's signature which settings reach it. Each ``*_options``
function here builds one group from the parsed flags; nothing converts through dicts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tunesmith.config import DataArgs, ModelArgs, TemplateArgs, TrainArgs
from tunesmith.utils import UserError


@dataclass
class DataOptions:
    """Which records to read and how (the data flags)."""

    dataset: list[str] = field(default_factory=list)
    """--dataset: local files, 'self-cognition', hub ids; 'name#N' samples N records."""
    val_dataset: list[str] = field(default_factory=list)
    """--val_dataset: validation datasets, same forms."""
    split_ratio: float = 0.0
    """--split_dataset_ratio: share of the training records held out (without val_dataset)."""
    probs: list[float] | None = None
    """--dataset_probs: interleave the datasets with these probabilities (None: concatenate)."""
    model_name: list[str] | None = None
    """--model_name, for the self-cognition set."""
    model_author: list[str] | None = None
    """--model_author, for the self-cognition set."""
    columns: dict[str, str] = field(default_factory=dict)
    """--columns: raw field name -> the name tunesmith expects."""
    fmt: str | None = None
    """--dataset_format: force one record format instead of detecting it."""
    strict: bool = True
    """--strict: a bad record is an error (True) or skipped and counted (False)."""
    use_hf: bool = True
    """Load hub datasets from Hugging Face (False: ModelScope)."""
    seed: int = 42
    """Seed for ``#N`` samples, mixing and splitting."""
    num_proc: int = 1
    """--dataset_num_proc: processes that tokenize."""
    prompt_only: bool = False
    """Inference data: a record's final assistant reply is optional (it is the reference)."""


@dataclass(frozen=True)
class TemplateOptions:
    """How a conversation becomes token ids (the template flags)."""

    system: str | None = None
    """--system: default system prompt where a record has none."""
    max_length: int = 2048
    """--max_length: most tokens per sample."""
    truncation: str = "delete"
    """--truncation_strategy: delete, left or right."""
    loss_scale: str = "default"
    """--loss_scale: default (every assistant turn) or last_round."""


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how (the model flags)."""

    model: str | None = None
    """--model: local directory, .gguf file, hub id or demo alias (None: decided by caller)."""
    model_type: str | None = None
    """--model_type: only checked against the model's config."""
    template: str | None = None
    """--template: only checked against the model's config."""
    torch_dtype: str = "auto"
    """--torch_dtype: auto, bfloat16, float16 or float32."""
    use_hf: bool = True
    """Download hub ids from Hugging Face (False: ModelScope)."""
    attn_impl: str = "sdpa"
    """--attn_impl: attention implementation."""


@dataclass(frozen=True)
class LoraOptions:
    """The adapter trained by ``--train_type lora``."""

    rank: int = 8
    """--lora_rank."""
    alpha: int = 32
    """--lora_alpha."""
    dropout: float = 0.05
    """--lora_dropout."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """--target_modules: all-linear, module names, or one regular expression."""
    modules_to_save: tuple[str, ...] = ()
    """--modules_to_save: modules trained in full beside the adapter."""
    use_rslora: bool = False
    """--use_rslora."""
    use_dora: bool = False
    """--use_dora."""
    dtype: str = "float32"
    """--lora_dtype: dtype of the adapter weights and their optimizer state."""


@dataclass(frozen=True)
class QuantOptions:
    """QLoRA: the frozen base quantized by bitsandbytes (``bits`` 0: not quantized)."""

    bits: int = 0
    """--quantization_bit: 0, 4 or 8."""
    quant_type: str = "nf4"
    """--bnb_4bit_quant_type: nf4 or fp4."""
    double_quant: bool = True
    """--bnb_4bit_use_double_quant."""
    compute_dtype: str | None = None
    """--bnb_4bit_compute_dtype (None: the run's --torch_dtype)."""


@dataclass(frozen=True)
class OptimOptions:
    """AdamW, gradient clipping and the learning-rate schedule."""

    learning_rate: float = 1e-4
    """--learning_rate: the peak learning rate."""
    weight_decay: float = 0.1
    """--weight_decay, on matrices only."""
    betas: tuple[float, float] = (0.9, 0.95)
    """--adam_beta1, --adam_beta2."""
    max_grad_norm: float = 1.0
    """--max_grad_norm (0: no clipping)."""
    scheduler: str = "cosine"
    """--lr_scheduler_type: cosine, linear or constant."""
    warmup_ratio: float = 0.0
    """--warmup_ratio: share of the steps spent warming up."""
    warmup_steps: int = 0
    """--warmup_steps (wins over warmup_ratio when > 0)."""


def parse_columns(value: str | None) -> dict[str, str]:
    """``--columns '{"question": "query"}'`` as a dict (also ``question:query,answer:response``)."""
    if not value:
        return {}
    try:
        mapping = json.loads(value)
    except json.JSONDecodeError:
        pairs = [p.split(":", 1) for p in value.split(",") if p.strip()]
        if not all(len(p) == 2 for p in pairs):
            raise UserError(
                f'--columns {value!r}: expected JSON like \'{{"question": "query"}}\''
            ) from None
        mapping = {a.strip(): b.strip() for a, b in pairs}
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise UserError(f"--columns {value!r}: expected an object of column names")
    return mapping


def parse_probs(value: str | None) -> list[float] | None:
    """``--dataset_probs '0.4:0.4:0.2'`` (also comma- or space-separated)."""
    if not value:
        return None
    try:
        return [float(x) for x in re.split(r"[:,\s]+", value.strip()) if x]
    except ValueError:
        raise UserError(f"--dataset_probs {value!r}: expected numbers like 0.4:0.4:0.2") from None


def data_options(args: DataArgs, use_hf: bool = True) -> DataOptions:
    """DataOptions from the data flags (``sft``, ``data``); ``use_hf`` is a model flag."""
    return DataOptions(
        dataset=list(args.dataset),
        val_dataset=list(args.val_dataset),
        split_ratio=args.split_dataset_ratio,
        probs=parse_probs(args.dataset_probs),
        model_name=args.model_name,
        model_author=args.model_author,
        columns=parse_columns(args.columns),
        fmt=args.dataset_format,
        strict=args.strict,
        use_hf=use_hf,
        seed=args.seed,
        num_proc=args.dataset_num_proc,
    )


def template_options(args: TemplateArgs) -> TemplateOptions:
    """TemplateOptions from the template flags."""
    return TemplateOptions(
        system=args.system,
        max_length=args.max_length,
        truncation=args.truncation_strategy,
        loss_scale=args.loss_scale,
    )


def model_options(args: ModelArgs, default_model: str | None = None) -> ModelOptions:
    """ModelOptions from the model flags; ``default_model`` stands in for an unset --model."""
    return ModelOptions(
        model=args.model if args.model is not None else default_model,
        model_type=args.model_type,
        template=args.template,
        torch_dtype=args.torch_dtype,
        use_hf=args.use_hf,
        attn_impl=args.attn_impl,
    )


def lora_options(args: TrainArgs) -> LoraOptions:
    """LoraOptions from the LoRA flags."""
    return LoraOptions(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        modules_to_save=tuple(args.modules_to_save),
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        dtype=args.lora_dtype,
    )


def quant_options(args: TrainArgs) -> QuantOptions:
    """QuantOptions from ``--quantization_bit`` and the ``--bnb_4bit_*`` flags."""
    return QuantOptions(
        bits=args.quantization_bit,
        quant_type=args.bnb_4bit_quant_type,
        double_quant=args.bnb_4bit_use_double_quant,
        compute_dtype=args.bnb_4bit_compute_dtype,
    )


def optim_options(args: TrainArgs) -> OptimOptions:
    """OptimOptions from the optimizer and schedule flags."""
    return OptimOptions(
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        max_grad_norm=args.max_grad_norm,
        scheduler=args.lr_scheduler_type,
        warmup_ratio=args.warmup_ratio,
        warmup_steps=args.warmup_steps,
    )
