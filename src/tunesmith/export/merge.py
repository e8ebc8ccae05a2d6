"""``tunesmith export --adapters CKPT --merge_lora true``: a merged Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import ExportArgs
from tunesmith.export.hub import check_push_args, push_to_hub
from tunesmith.model.adapters import load_adapted, merge_and_save, merged_dir, resolve_base
from tunesmith.model.load import resolve_dtype
from tunesmith.options import model_options
from tunesmith.utils import UserError


def export_merged(args: ExportArgs) -> Path:
    """Merge ``--adapters`` into their base, save ``CHECKPOINT-merged/`` (or --output_dir) and
    upload it when asked; returns the directory."""
    if not args.adapters or not args.merge_lora:
        raise UserError(
            "tunesmith export: pass --adapters CHECKPOINT --merge_lora true, or --to gguf|ollama"
        )
    token = check_push_args(args.hub_model_id, args.hub_token) if args.push_to_hub else None
    base = resolve_base(model_options(args), args.adapters, args.system)
    out = merged_dir(base.adapters[-1], args.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.torch_dtype, device.type)
    model, tokenizer = load_adapted(base, dtype, device, args.attn_impl, quantized=False)
    merge_and_save(model, tokenizer, out)
    if token is not None:
        push_to_hub(out, args.hub_model_id, token, args.hub_private_repo)
    return out
