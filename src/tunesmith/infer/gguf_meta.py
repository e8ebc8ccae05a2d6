"""The few GGUF header values the llamacpp backend needs, read without parsing the whole file.

``gguf.GGUFReader`` turns every metadata array into Python objects, and a Qwen2 GGUF carries
151k vocabulary strings and as many merges: about 10 s on the 2-core machine, per load, which
was a sixth of ``tunesmith eval``'s time on llama.cpp. This reads the key/value section in
order, skips arrays by their lengths, and stops once the wanted keys are found.
(GGUF layout: magic, version, tensor count, key/value count, then each key as a
length-prefixed string, a value type and the value; all little-endian.)
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from tunesmith.utils import UserError

# GGUF value types -> struct format of one scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("file ends inside the header")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO) -> bytes:
    return f.read(_read(f, "Q"))


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    """Read (``keep``) or skip one value of type ``vtype``."""
    if vtype == _STRING:
        raw = _string(f)
        return raw.decode("utf-8") if keep else None
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _ARRAY:
        etype, count = _read(f, "I"), _read(f, "Q")
        if etype in _SCALARS:  # fixed size: one seek
            f.seek(struct.calcsize("<" + _SCALARS[etype]) * count, 1)
        else:
            for _ in range(count):
                _value(f, etype, False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path: Path) -> dict[str, Any]:
    """``arch``, ``context_length`` and ``chat_template`` of a GGUF file, as
    :func:`tunesmith.infer.llamacpp_backend.gguf_header` returns them (None when absent)."""
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic number")
            _version, _tensors, n_kv = _read(f, "I"), _read(f, "Q"), _read(f, "Q")
            for _ in range(n_kv):
                key = _string(f).decode("utf-8", "replace")
                arch = found.get("general.architecture")
                wanted = key in ("general.architecture", "tokenizer.chat_template") or (
                    arch is not None and key == f"{arch}.context_length"
                )
                value = _value(f, _read(f, "I"), wanted)
                if wanted:
                    found[key] = value
    except (ValueError, OSError, struct.error) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    arch = found.get("general.architecture")
    return {
        "arch": arch,
        "context_length": found.get(f"{arch}.context_length"),
        "chat_template": found.get("tokenizer.chat_template"),
    }


def load_llamacpp_quick(args: Any) -> Any:
    """:func:`~tunesmith.infer.llamacpp_backend.load_llamacpp` with the header read by
    :func:`read_header`: the same engine, seconds sooner. (A candidate for
    ``llamacpp_backend.gguf_header`` itself; kept apart while another change owns that file.)"""
    import numpy as np

    from tunesmith.infer.llamacpp_backend import (
        AUTO_ARCHS,
        LlamaCppEngine,
        context_size,
        cpu_threads,
        generation_config,
        import_llama_cpp,
    )
    from tunesmith.model.adapters import run_args
    from tunesmith.model.gguf_cache import cached_gguf
    from tunesmith.utils import error_line, logger

    llama_cpp = import_llama_cpp()
    path, base_dir = cached_gguf(args)
    system = args.system
    if system is None and args.adapters:
        system = run_args(Path(args.adapters[0]).expanduser()).get("system")
    header = read_header(path)
    n_ctx = context_size(header, args.max_model_len, path)
    if not header["chat_template"]:
        raise UserError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template)")
    threads = cpu_threads()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
            n_threads_batch=threads, seed=args.seed, verbose=False,
        )  # fmt: skip
    except ValueError as e:
        arch = header["arch"]
        why = f"architecture '{arch}'" if arch not in AUTO_ARCHS else error_line(e)
        raise UserError(f"{path}: llama.cpp cannot load this GGUF file ({why}); use "
                        "--infer_backend pt") from None  # fmt: skip
    special = {
        "bos_token": llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace"),
        "eos_token": llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace"),
    }
    logger.info(f"llama.cpp loaded {path.name} ({header['arch']}, context {n_ctx}, "
                f"{threads} threads)")  # fmt: skip
    return LlamaCppEngine(llm, path, system, generation_config(base_dir), header["chat_template"],
                          special, n_ctx, np.random.default_rng(args.seed))  # fmt: skip
