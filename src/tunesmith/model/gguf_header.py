"""The key-value metadata of a GGUF file, read without its tensors.

gguf-py's ``GGUFReader`` builds a Python object for every element of every array, so on a
Qwen2.5 file (151,936 tokens and as many merges) it takes about 10 s before the first key can
be read; the llamacpp backend needs three scalars of the header at every start. This walks the
key-value section once, skipping the arrays' bytes (format: github.com/ggml-org/ggml,
docs/gguf.md; little-endian files, version 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

# Value types of the format: struct code of a scalar, or None for string (8) and array (9).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_kv(path: Path, wanted: set[str] | None = None) -> dict[str, Any]:
    """The header's scalar and string values by key (``wanted`` only, when given); arrays are
    skipped. Raises ``GGUFFormatError`` for a file that is not GGUF, ``OSError`` if unreadable."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFFormatError("no GGUF magic number at the start")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (this reader knows 2 and 3)")
        pos, out = 24, {}
        try:
            for _ in range(n_kv):
                key, pos = _string(buf, pos)
                (kind,) = struct.unpack_from("<I", buf, pos)
                value, pos = _value(buf, pos + 4, kind)
                if wanted is None or key in wanted:
                    out[key] = value
        except (struct.error, UnicodeDecodeError) as e:
            raise GGUFFormatError(f"a truncated or damaged header ({e})") from None
        return out


def _string(buf: Any, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise struct.error("a string runs past the end of the file")
    return buf[pos + 8 : end].decode("utf-8"), end


def _value(buf: Any, pos: int, kind: int) -> tuple[Any, int]:
    """(value, position after it); arrays give None."""
    if kind == _STRING:
        return _string(buf, pos)
    if kind in _SCALARS:
        code = "<" + _SCALARS[kind]
        return struct.unpack_from(code, buf, pos)[0], pos + struct.calcsize(code)
    if kind != _ARRAY:
        raise GGUFFormatError(f"unknown value type {kind}")
    elem, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem in _SCALARS:
        return None, pos + count * struct.calcsize("<" + _SCALARS[elem])
    if elem != _STRING:
        # Nested arrays are allowed by the format but written by no converter we know of.
        for _ in range(count):
            _, pos = _value(buf, pos, elem)
        return None, pos
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):  # only the lengths are read: ~0.1 s for 300k strings
        pos += 8 + unpack(buf, pos)[0]
    return None, pos
