"""``model/gguf_header.read_kv`` reads the same header values as gguf-py's ``GGUFReader``, and
refuses files that are not GGUF in one error type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tunesmith.model.gguf_header import GGUFFormatError, read_kv


def write(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(4096)
    w.add_chat_template("{{ messages }}")
    w.add_token_list(["a", "bé", "<|im_end|>", "x" * 300])
    w.add_token_scores([0.5, -1.0, 2.0, 0.0])
    w.add_bool("test.flag", True)
    w.add_float32("test.f32", 1.5)
    w.add_int64("test.i64", -7)
    w.add_float64("test.f64", 2.25)
    w.add_array("test.ints", [1, 2, 3])
    w.add_string("test.after_arrays", "still read")
    w.add_tensor("w", np.ones((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_values_equal_gguf_readers(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    write(path)
    kv = read_kv(path)
    fields = GGUFReader(path).fields
    assert set(kv) == {k for k in fields if not k.startswith("GGUF.")}
    for key, value in kv.items():
        expect = fields[key].contents()
        if isinstance(expect, list):
            assert value is None, key  # arrays are skipped
        else:
            assert value == pytest.approx(expect) if isinstance(value, float) else value == expect
    assert kv["qwen2.context_length"] == 4096 and kv["test.after_arrays"] == "still read"
    assert read_kv(path, {"general.architecture"}) == {"general.architecture": "qwen2"}


def test_not_gguf_or_truncated_is_a_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(GGUFFormatError, match="no GGUF magic"):
        read_kv(bad)
    good = tmp_path / "m.gguf"
    write(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(GGUFFormatError, match="truncated"):
        read_kv(cut)
