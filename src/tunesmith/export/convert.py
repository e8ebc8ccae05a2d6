"""``tunesmith export --to gguf|ollama``: load (and merge) a model, write it, optionally upload."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import ExportArgs
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


def export(args: ExportArgs) -> Path:
    """``tunesmith export``: ``--to gguf|ollama``, else merge ``--adapters`` into their base."""
    if args.to:
        return export_to(args)
    from tunesmith.export.merge import export_merged

    return export_merged(args)


def export_to(args: ExportArgs) -> Path:
    """Write ``--to gguf`` (one file) or ``--to ollama`` (a folder); upload it when asked."""
    from tunesmith.export.hub import check_push_args, push_to_hub
    from tunesmith.export.ollama import write_ollama
    from tunesmith.model.gguf_write import write_gguf

    token = check_push_args(args.hub_model_id, args.hub_token) if args.push_to_hub else None
    from tunesmith.model.gguf_cache import load_for_export

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
