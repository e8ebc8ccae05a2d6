"""``tunesmith export --to gguf|ollama``: load (and merge) a model, write it, optionally upload."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tunesmith.config import ExportArgs
from tunesmith.options import model_options
from tunesmith.utils import UserError


def default_target(args: ExportArgs, source: Path | None, name: str) -> Path:
    """Where ``--to`` writes: ``--output_dir`` (a folder, or a path ending in .gguf), else
    beside the checkpoint or model directory (``CKPT-merged.gguf``, ``CKPT-ollama/``), else
    in the current folder for a demo alias or hub id."""
    base = name
    if source is not None and source.suffix.lower() == ".gguf":
        base = f"{source.stem}-{args.gguf_type}"  # re-typing a GGUF file: never overwrite it
    folder = source.parent if source is not None else Path.cwd()
    file_name = f"{base}-merged.gguf" if args.adapters else f"{base}.gguf"
    if args.output_dir:
        out = Path(args.output_dir).expanduser()
        if args.to == "gguf" and out.suffix.lower() != ".gguf":
            return out / file_name
        return out
    return folder / (file_name if args.to == "gguf" else f"{base}-ollama")


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"


def load_for_export(args: ExportArgs) -> tuple[Any, Any, str | None, Path | None, str]:
    """(model, tokenizer, system prompt, source path, base name) for ``--to``.

    With ``--adapters`` the adapters are merged in memory, in float32 unless --torch_dtype
    says otherwise: a LoRA delta is small beside the weights, and adding it in bf16 would round
    part of it away; the GGUF conversion then rounds once.
    """
    import torch

    from tunesmith.model.adapters import load_adapted, merged, resolve_base
    from tunesmith.model.load import load_model, load_tokenizer, resolve_dtype, resolve_model

    if args.adapters:
        base = resolve_base(model_options(args), args.adapters, args.system)
        ckpt = base.adapters[-1]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype("float32" if args.torch_dtype == "auto" else args.torch_dtype,
                              device.type, compute=False)  # fmt: skip
        model, tokenizer = load_adapted(base, dtype, device, args.attn_impl, quantized=False)
        return merged(model), tokenizer, base.system, ckpt, ckpt.name
    if not args.model:
        raise UserError("tunesmith export --to: pass --model MODEL or --adapters CHECKPOINT")
    model_dir = resolve_model(args.model, args.use_hf)
    local = Path(args.model).expanduser()
    source = local.resolve() if local.exists() else None
    name = _safe_name(source.name if source is not None else args.model.split("/")[-1])
    if source is not None and source.is_dir():
        name = source.name
    from transformers import AutoConfig

    from tunesmith.export.gguf import check_architecture

    check_architecture(AutoConfig.from_pretrained(model_dir))  # refuse before loading weights
    dtype: Any = "auto"  # the checkpoint's own dtype: converting once, to the GGUF type
    if args.torch_dtype != "auto":
        dtype = resolve_dtype(args.torch_dtype, "cpu", compute=False)
    return load_model(model_dir, dtype), load_tokenizer(model_dir), args.system, source, name


def export(args: ExportArgs) -> Path:
    """``tunesmith export``: ``--to gguf|ollama``, else merge ``--adapters`` into their base."""
    if args.to:
        return export_to(args)
    from tunesmith.export.merge import export_merged

    return export_merged(args)


def export_to(args: ExportArgs) -> Path:
    """Write ``--to gguf`` (one file) or ``--to ollama`` (a folder); upload it when asked."""
    from tunesmith.export.gguf import write_gguf
    from tunesmith.export.hub import check_push_args, push_to_hub
    from tunesmith.export.ollama import write_ollama

    token = check_push_args(args.hub_model_id, args.hub_token) if args.push_to_hub else None
    model, tokenizer, system, source, name = load_for_export(args)
    out = default_target(args, source, name)
    if source is not None and out.resolve() == source.resolve():
        raise UserError(f"--output_dir {out}: that is the input model; choose another path")
    if args.to == "gguf":
        write_gguf(model, tokenizer, out, args.gguf_type, name=name)
    else:
        write_ollama(model, tokenizer, out, args.gguf_type, system, name=name)
    if token is not None:
        push_to_hub(out, args.hub_model_id, token, args.hub_private_repo)
    return out
