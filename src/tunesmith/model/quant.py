"""QLoRA: a frozen base quantized by bitsandbytes (4 or 8 bits) under a trained LoRA adapter.

The base is quantized while it loads (transformers' ``BitsAndBytesConfig``); the adapter,
the loss, autocast and the checkpoints are exactly those of plain LoRA, so a QLoRA checkpoint
is an ordinary peft adapter directory.

peft's ``prepare_model_for_kbit_training`` is deliberately not called. Of what it does,
freezing the base is done by ``get_peft_model``, gradient checkpointing by
``--gradient_checkpointing`` (non-reentrant, so the inputs need no ``requires_grad`` hook),
and the rest is an fp32 copy of every weight bitsandbytes leaves unquantized (embeddings,
LM head, norms). That copy exists for fp16 training without autocast; under the loop's
autocast those weights are computed in the compute dtype anyway, it makes the residual stream
fp32 (twice the checkpointed activations), and on a 7B model it adds 2.2 GB to the ~5.6 GB
of QLoRA weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesmith.options import QuantOptions
from tunesmith.utils import UserError, logger

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

BITS = (4, 8)
INSTALL = "pip install 'tunesmith[qlora]'"
DTYPES = ("float32", "bfloat16", "float16")


def check_quantization(quant: QuantOptions, full: bool) -> None:
    """Refuse a ``--quantization_bit`` this run cannot honour, in one sentence.

    Called before data, model or output directory are touched; ``full``: --train_type full.
    """
    import torch

    bits = quant.bits
    if bits == 0:
        if quant != QuantOptions():
            logger.info("note: the --bnb_4bit_* flags apply with --quantization_bit 4 only")
        return
    if bits not in BITS:
        raise UserError(f"--quantization_bit must be 4 or 8 (0: no quantization), got {bits}")
    if full:
        raise UserError(
            f"--quantization_bit {bits} trains a LoRA adapter on a frozen quantized base, so it "
            "cannot be combined with --train_type full: drop one of the two"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"--quantization_bit {bits} needs a CUDA GPU (bitsandbytes {bits}-bit); this machine "
            "has none: drop the flag to train LoRA in bf16/fp32"
        )
    require_bitsandbytes(f"--quantization_bit {bits}")


def require_bitsandbytes(what: str) -> None:
    """Import bitsandbytes, or say in one sentence how to install it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{what} needs bitsandbytes, which is not installed: {INSTALL}") from None


def check_lora_dtype(lora_dtype: str, compute_dtype: torch.dtype, full: bool) -> None:
    """Refuse ``--lora_dtype`` combinations that cannot train."""
    import torch

    if lora_dtype not in DTYPES:
        raise UserError(f"--lora_dtype must be one of {', '.join(DTYPES)}, got {lora_dtype}")
    if full and lora_dtype != "float32":
        raise UserError("--lora_dtype sets the LoRA weights' dtype; --train_type full has none")
    if lora_dtype == "float16" and compute_dtype == torch.float16:
        # fp16 autocast scales the loss, and the scaler refuses to unscale fp16 gradients.
        raise UserError(
            "--lora_dtype float16 cannot train under float16 mixed precision (the loss scaler "
            "needs float32 or bfloat16 weights): use --lora_dtype float32 or bfloat16"
        )


def bnb_config(
    bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype
) -> BitsAndBytesConfig:
    """The transformers ``BitsAndBytesConfig`` for ``--quantization_bit`` and the bnb flags.

    ``compute_dtype`` is the dtype 4-bit weights are dequantized to for each matmul; 8-bit
    ignores it (LLM.int8 computes in int8 with fp16 outliers).
    """
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def bnb_config_from(quant: QuantOptions, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """``bnb_config`` for ``quant``; None without quantization.

    The compute dtype defaults to the run's ``--torch_dtype``, resolved: ``dtype``.
    """
    import torch

    if not quant.bits:
        return None
    compute = getattr(torch, quant.compute_dtype) if quant.compute_dtype else dtype
    return bnb_config(quant.bits, quant.quant_type, quant.double_quant, compute)


def recorded_quant(recorded: dict[str, Any]) -> QuantOptions:
    """The quantization a run trained with, from its ``args.json`` (older runs may lack keys)."""
    return QuantOptions(
        bits=recorded.get("quantization_bit") or 0,
        quant_type=recorded.get("bnb_4bit_quant_type") or "nf4",
        double_quant=bool(recorded.get("bnb_4bit_use_double_quant", True)),
        compute_dtype=recorded.get("bnb_4bit_compute_dtype"),
    )


def recorded_bnb_config(
    recorded: dict[str, Any], dtype: torch.dtype, device_type: str
) -> BitsAndBytesConfig | None:
    """For ``infer --adapters``: load the base quantized as the run trained it, where possible.

    Returns None (full-precision base) for unquantized runs, and, with a note, where this
    machine cannot load it quantized: the adapter still applies, its answers may differ a little.
    """
    bits = recorded.get("quantization_bit") or 0
    if not bits:
        return None
    try:
        if device_type != "cuda":
            raise UserError("this machine has no CUDA GPU")
        require_bitsandbytes("a quantized base")
    except UserError as e:
        logger.info(
            f"note: the adapter was trained on a {bits}-bit base, which needs a CUDA GPU and "
            f"bitsandbytes ({e}); loading the base unquantized instead"
        )
        return None
    return bnb_config_from(recorded_quant(recorded), dtype)


def set_lora_dtype(model: torch.nn.Module, lora_dtype: str) -> None:
    """Cast the LoRA weights (A, B, DoRA magnitudes) to ``lora_dtype``; the optimizer follows.

    peft creates them in fp32; ``modules_to_save`` copies keep the base's dtype.
    """
    import torch

    dtype = getattr(torch, lora_dtype)
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" in name and p.dtype != dtype:
            p.data = p.data.to(dtype)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed 4-bit tensor holds two weights per byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
