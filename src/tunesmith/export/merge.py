"""Merge LoRA adapters into their base and save a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.utils import UserError, atomic_dir, logger


def merged_dir(adapter: Path, output_dir: str | None) -> Path:
    """Where the merged model goes: ``--output_dir``, else ``<checkpoint>-merged`` beside it."""
    return (
        Path(output_dir).expanduser() if output_dir else adapter.with_name(adapter.name + "-merged")
    )


def merged(model: Any) -> Any:
    """``model`` with its peft adapters folded into the weights; a plain model as it is."""
    if hasattr(model, "merge_and_unload"):  # a PeftModel; a plain model has nothing to merge
        return model.merge_and_unload()
    return model


def merge_and_save(engine: Any, out: Path) -> Path:
    """Fold the engine's adapters into its weights and save model, config and tokenizer.

    The directory appears under its final name only when complete; what plain transformers
    needs to load it and chat (config, generation config, safetensors shards, tokenizer with
    chat template) is all inside.
    """
    model = engine.model = merged(engine.model)
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
            engine.tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"could not write the merged model to {out} ({e.strerror or e})") from None
    logger.info(f"merged model saved: {out}")
    return out
