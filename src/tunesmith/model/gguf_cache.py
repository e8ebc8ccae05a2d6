"""The GGUF file the ``llamacpp`` backend runs: exported once, then reused while its inputs last.

``--model file.gguf`` is used as it is. ``--model DIR`` (or ``demo``, or a hub id) is written once
by :func:`tunesmith.model.gguf_write.write_gguf` into the model cache; ``--adapters CKPT`` is merged
into its base (in float32, as ``tunesmith export --to gguf`` does) and written once beside the
checkpoint. The file name carries a hash of what went into it (adapter weights and config, the
checkpoint's tokenizer, the base model's files, ``--gguf_type`` and the writer's version), so a
retrained checkpoint or another type gets a new file and a stale one is never used. Files appear
only when complete (``utils.atomic_file``), so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from tunesmith.config import ExportArgs, InferCommandArgs
from tunesmith.options import model_options
from tunesmith.utils import UserError, cache_dir, error_line, logger

WRITER_VERSION = "1"
"""Bumped when ``write_gguf``'s output changes, so that files cached by an older one are rebuilt."""

# Files of a checkpoint that change the exported model: the adapter and the tokenizer it was
# trained with (the optimizer, RNG and trainer state do not).
_CKPT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def is_gguf_file(model: str | None) -> bool:
    """True when ``--model`` names a ``.gguf`` file (used as it is, no export)."""
    if model is None or not model.lower().endswith(".gguf"):
        return False
    return Path(model).expanduser().is_file()


def dir_fingerprint(path: Path) -> str:
    """A cheap identity of a model directory: every file's name, size and modification time.

    Reading gigabytes of weights to hash them would cost seconds on every start; a rewritten
    file changes its size or mtime, which is what a cache key needs to notice.
    """
    h = hashlib.sha256(str(path.resolve()).encode())
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), path)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def checkpoint_hash(adapters: list[Path], base_dir: Path, gguf_type: str) -> str:
    """The content hash of a merged export: every adapter's weights, config and tokenizer (in
    order), the base model's fingerprint, the GGUF type and the writer version."""
    h = hashlib.sha256(f"v{WRITER_VERSION}|{gguf_type}|{dir_fingerprint(base_dir)}\n".encode())
    for adapter in adapters:
        for name in _CKPT_FILES:
            f = adapter / name
            if f.is_file():
                h.update(f"{name}\n".encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def gguf_target(args: InferCommandArgs) -> tuple[Path, Path]:
    """(where the GGUF file for ``args`` lives, the base model directory it comes from).

    Resolving the base is cheap (no weights are read); it downloads or converts a model only
    where the ``pt`` backend would too.
    """
    from tunesmith.model.adapters import resolve_base

    base = resolve_base(model_options(args), args.adapters, args.system)
    gguf_type = args.gguf_type
    if base.adapters:
        ckpt = base.adapters[-1]
        key = checkpoint_hash(base.adapters, base.model_dir, gguf_type)
        name = f"{ckpt.name}-merged-{gguf_type}-{key}.gguf"
        # Beside the checkpoint, like `export --to gguf`; a read-only run folder uses the cache.
        folder = ckpt.parent if _writable(ckpt.parent) else cache_dir() / "gguf"
        return folder / name, base.model_dir
    fp = hashlib.sha256(f"v{WRITER_VERSION}|{dir_fingerprint(base.model_dir)}".encode())
    name = f"{base.model_dir.name}-{gguf_type}-{fp.hexdigest()[:16]}.gguf"
    return cache_dir() / "gguf" / name, base.model_dir


def cached_gguf(args: InferCommandArgs) -> tuple[Path, Path | None]:
    """The GGUF file to run for ``--model`` / ``--adapters`` and the HF directory of its base
    (None for a ``.gguf`` given directly), exporting it first when it is not cached yet."""
    if is_gguf_file(args.model) and not args.adapters:
        return Path(args.model).expanduser(), None
    out, base_dir = gguf_target(args)
    if out.is_file():
        logger.info(f"llamacpp: using the cached GGUF file {out}")
        return out, base_dir
    logger.info(f"llamacpp: writing the {args.gguf_type} GGUF file once: {out}")
    _export(args, out)
    _remove_stale(out)
    return out, base_dir


def _export(args: InferCommandArgs, out: Path) -> None:
    """Merge (with ``--adapters``) and write ``out`` through ``export --to gguf``'s own path."""
    from tunesmith.model.gguf_write import write_gguf

    try:
        model, tokenizer, _system, _source, name = load_for_export(args)
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as e:
        what = f"--adapters {args.adapters[-1]}" if args.adapters else f"--model {args.model}"
        raise UserError(
            f"{what}: cannot be merged and exported for llama.cpp ({error_line(e)}); "
            "use --infer_backend pt"
        ) from None
    write_gguf(model, tokenizer, out, args.gguf_type, name=name)


def _remove_stale(current: Path) -> None:
    """Delete files of the same checkpoint (or model) and type written for older contents."""
    prefix = current.name[: current.name.rfind("-") + 1]
    for old in current.parent.glob(f"{prefix}*.gguf"):
        if old != current and len(old.name) == len(current.name):
            old.unlink(missing_ok=True)


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "model"


def load_for_export(
    args: ExportArgs | InferCommandArgs,
) -> tuple[Any, Any, str | None, Path | None, str]:
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

    from tunesmith.model.gguf_write import check_architecture

    check_architecture(AutoConfig.from_pretrained(model_dir))  # refuse before loading weights
    dtype: Any = "auto"  # the checkpoint's own dtype: converting once, to the GGUF type
    if args.torch_dtype != "auto":
        dtype = resolve_dtype(args.torch_dtype, "cpu", compute=False)
    return load_model(model_dir, dtype), load_tokenizer(model_dir), args.system, source, name
