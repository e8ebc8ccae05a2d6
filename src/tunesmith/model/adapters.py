"""LoRA checkpoints after training: find them, resolve their base, load, merge, save merged.

``infer``, ``export`` (and ``eval``, ``serve``) all start from ``--model`` / ``--adapters``:
the base model and the system prompt are read from the run's ``args.json`` beside the
checkpoint, so a checkpoint directory is all a user has to name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.model.load import (
    check_model_type,
    has_tokenizer,
    load_model,
    load_tokenizer,
    resolve_model,
)
from tunesmith.model.quant import recorded_bnb_config
from tunesmith.options import ModelOptions
from tunesmith.utils import UserError, atomic_dir, error_line, logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def run_args(adapter: Path) -> dict[str, Any]:
    """The ``args.json`` of the run an adapter checkpoint belongs to ({} if there is none)."""
    for candidate in (adapter / "args.json", adapter.parent / "args.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return {}


def check_adapter(path: str) -> Path:
    """A directory holding a peft adapter, or a UserError naming what is missing.

    A run directory trained with ``--load_best_model_at_end`` stands for its best checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--adapters {path}: no such directory")
    best = p / "best_checkpoint.json"
    if best.is_file():  # a run trained with --load_best_model_at_end
        p = Path(json.loads(best.read_text(encoding="utf-8"))["best_model_checkpoint"])
    if not (p / "adapter_config.json").is_file():
        ckpts = [c for c in list_checkpoints(p) if (c / "adapter_config.json").is_file()]
        hint = f" (did you mean {ckpts[-1]}?)" if ckpts else ""
        raise UserError(
            f"--adapters {path}: no adapter_config.json there, so it is not a LoRA checkpoint "
            f"directory like output/v0-…/checkpoint-30{hint}"
        )
    if not any((p / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(
            f"--adapters {path}: the adapter weights (adapter_model.safetensors) are missing"
        )
    return p


@dataclass
class Base:
    """A base model, the adapters on it, and the run they came from (no weights loaded)."""

    name: str
    """The model as the user knows it (``--model``, or the run's)."""
    model_dir: Path
    """The local Hugging Face directory it resolved to."""
    adapters: list[Path]
    """Checked adapter checkpoints, applied in order."""
    recorded: dict[str, Any]
    """The ``args.json`` of the first adapter's run ({} without adapters)."""
    system: str | None
    """``--system``, else the run's system prompt."""
    tokenizer_dir: Path
    """Where the tokenizer comes from: the last checkpoint when it carries one."""


def resolve_base(model: ModelOptions, adapters: list[str], system: str | None = None) -> Base:
    """Find the base model of ``--model`` / ``--adapters``; ``system`` is ``--system``."""
    checked = [check_adapter(a) for a in adapters]
    recorded = run_args(checked[0]) if checked else {}
    name = model.model or recorded.get("model")
    resolved = recorded.get("model_dir")
    # The run recorded where its base model resolved to; a relative --model or a hub id may
    # not resolve the same way from another folder.
    if model.model is None and resolved and Path(resolved, "config.json").is_file():
        name = resolved
    if name is None and checked:
        cfg = json.loads((checked[0] / "adapter_config.json").read_text(encoding="utf-8"))
        name = cfg.get("base_model_name_or_path")
    name = name or "demo"
    model_dir = resolve_model(name, model.use_hf)
    check_model_type(model_dir, model.model_type, model.template)
    # sft checkpoints carry the tokenizer they were trained with; a bare peft adapter does not.
    tok_dir = checked[-1] if checked and has_tokenizer(checked[-1]) else model_dir
    shown = model.model or recorded.get("model") or name
    system = system if system is not None else recorded.get("system")
    return Base(shown, model_dir, checked, recorded, system, tok_dir)


def load_adapted(
    base: Base,
    dtype: torch.dtype,
    device: torch.device,
    attn_impl: str = "sdpa",
    quantized: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode with the adapters applied, tokenizer).

    With ``quantized``, a QLoRA adapter meets its base quantized as in training where this
    machine can; a merge needs full precision (``quantized=False``). Several adapters are
    applied in order, each merged before the next.
    """
    from peft import PeftModel

    tokenizer = load_tokenizer(base.tokenizer_dir)
    bnb = recorded_bnb_config(base.recorded, dtype, device.type) if quantized else None
    model = load_model(base.model_dir, dtype, attn_impl, device=device, quantization_config=bnb)
    for i, adapter in enumerate(base.adapters):
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"--adapters {adapter}: does not fit the base model {base.name} ({error_line(e)})"
            ) from None
        if i < len(base.adapters) - 1:
            model = model.merge_and_unload()  # apply adapters in order
    model.eval()
    shown = f" + {', '.join(map(str, base.adapters))}" if base.adapters else ""
    logger.info(f"loaded {base.name}{shown}")
    return model, tokenizer


def merged_dir(adapter: Path, output_dir: str | None) -> Path:
    """Where the merged model goes: ``--output_dir``, else ``<checkpoint>-merged`` beside it."""
    return (
        Path(output_dir).expanduser() if output_dir else adapter.with_name(adapter.name + "-merged")
    )


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its peft adapters folded into the weights; a plain model as it is."""
    if hasattr(model, "merge_and_unload"):  # a PeftModel; a plain model has nothing to merge
        return model.merge_and_unload()
    return model


def merge_and_save(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path
) -> torch.nn.Module:
    """Fold the adapters into the weights, save model, config and tokenizer to ``out``;
    returns the merged model.

    The directory appears under its final name only when complete; what plain transformers
    needs to load it and chat (config, generation config, safetensors shards, tokenizer with
    chat template) is all inside.
    """
    model = merged(model)
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise UserError(f"could not write the merged model to {out} ({e.strerror or e})") from None
    logger.info(f"merged model saved: {out}")
    return model
