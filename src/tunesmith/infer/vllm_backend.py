"""The optional vLLM backend, ``--infer_backend vllm`` (CUDA only, ``tunesmith[vllm]``).

vLLM loads the base model itself and applies a LoRA checkpoint natively per request (no merge),
with paged attention and continuous batching, which is what makes batch inference and serving
fast. tunesmith hands it the same things the ``pt`` backend uses: the base model directory
recorded in the run's ``args.json``, the adapter directory, and prompts rendered with the
tokenizer's own chat template, so both backends see identical token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import InferCommandArgs
from tunesmith.utils import UserError, logger

INSTALL_HINT = "pip install 'tunesmith[vllm]' (on a Linux host with a CUDA GPU)"
# vLLM sizes its LoRA buffers for one of these ranks; an adapter's rank is rounded up to one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class VllmEngine:
    """A vLLM model ready to answer chat messages."""

    llm: Any
    """The ``vllm.LLM`` instance."""
    tokenizer: Any
    """The tokenizer whose chat template renders the prompts."""
    system: str | None
    """Default system prompt (the training run's, unless overridden)."""
    lora: Any
    """The ``LoRARequest`` applied to every prompt, or None for the bare (or merged) model."""
    defaults: dict[str, Any]
    """Sampling settings of the model's ``generation_config.json``."""


def import_vllm() -> Any:
    """The ``vllm`` module, or a UserError with the install command."""
    try:
        import vllm
    except ImportError:
        raise UserError(
            f"--infer_backend vllm needs vLLM, which is not installed: {INSTALL_HINT}"
        ) from None
    return vllm


def lora_rank_for_vllm(adapter: Path) -> int:
    """The ``max_lora_rank`` vLLM needs for ``adapter``; refuses adapters vLLM cannot apply."""
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [
        flag
        for flag, used in (
            ("--use_dora", cfg.get("use_dora")),
            ("--modules_to_save", cfg.get("modules_to_save")),
        )
        if used
    ]
    if unsupported:
        raise UserError(
            f"--adapters {adapter}: vLLM cannot apply an adapter trained with "
            f"{' '.join(unsupported)}; merge it first (tunesmith export --adapters {adapter} "
            "--merge_lora true) and pass the merged model with --model, or use --infer_backend pt"
        )
    rank = int(cfg.get("r", 8))
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise UserError(f"--adapters {adapter}: LoRA rank {rank} is above vLLM's maximum (512)")
    return fits[0]


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling settings from the model's ``generation_config.json`` ({} when absent)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def sampling_kwargs(args: InferCommandArgs, defaults: dict[str, Any]) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments: the model's defaults under the user's flags.

    Matches the ``pt`` backend: an unset flag keeps the generation config's value, and
    ``--temperature 0`` is greedy decoding.
    """
    kw: dict[str, Any] = dict(defaults)
    for flag in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(args, flag)
        if value is not None:
            kw[flag] = value
    if kw.get("temperature", 1.0) <= 0:
        kw = {"temperature": 0.0}  # greedy: the other settings would be ignored anyway
    kw["max_tokens"] = args.max_new_tokens
    kw["seed"] = args.seed
    return kw


def load_vllm_engine(
    args: InferCommandArgs,
    model_dir: Path,
    tokenizer: Any,
    adapter: Path | None,
    system: str | None,
) -> VllmEngine:
    """Start vLLM on ``model_dir`` with ``adapter`` applied natively (none: the bare model)."""
    import torch

    vllm = import_vllm()
    if not torch.cuda.is_available():
        raise UserError(
            "--infer_backend vllm needs a CUDA GPU; on this machine use --infer_backend pt"
        )
    from vllm.lora.request import LoRARequest

    lora_kw: dict[str, Any] = {}
    lora = None
    if adapter is not None:
        lora_kw = {
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": lora_rank_for_vllm(adapter),
        }
        lora = LoRARequest("adapter", 1, str(adapter))
    llm = vllm.LLM(
        model=str(model_dir),
        dtype=args.torch_dtype,  # vLLM takes the same names
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        **lora_kw,
    )
    logger.info(f"vLLM loaded {model_dir}" + (f" + {adapter}" if adapter else ""))
    return VllmEngine(llm, tokenizer, system, lora, generation_defaults(model_dir))


def vllm_generate(
    engine: VllmEngine, conversations: list[list[dict[str, str]]], args: InferCommandArgs
) -> list[str]:
    """Answer many conversations at once (vLLM batches them continuously); order is kept."""
    from vllm import SamplingParams

    prompts = [
        engine.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in conversations
    ]
    params = SamplingParams(**sampling_kwargs(args, engine.defaults))
    outputs = engine.llm.generate(
        prompts, params, lora_request=engine.lora, use_tqdm=len(prompts) > 1
    )
    return [o.outputs[0].text for o in outputs]
