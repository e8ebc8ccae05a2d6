"""``tunesmith deploy``'s flags: refused before any model loads, with one clear sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main, parse_args
from tunesmith.config import DeployArgs
from tunesmith.serve.deploy import check_args, is_loopback
from tunesmith.serve.models import Catalog


def test_vllm_backend_is_refused(capsys) -> None:
    assert main(["deploy", "--infer_backend", "vllm"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max_concurrent", "--max_request_bytes", "--max_tokens_limit"])
def test_zero_limits_are_refused(flag: str, capsys) -> None:
    assert main(["deploy", flag, "0"]) == 2
    assert flag in capsys.readouterr().err


def test_pickled_or_badly_named_adapters_are_refused(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (ckpt / "adapter_model.bin").write_bytes(b"not really a pickle")
    assert main(["deploy", "--adapters", f"bot={ckpt}"]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["deploy", "--adapters", f"my bot={ckpt}"]) == 2
    assert "the name 'my bot'" in capsys.readouterr().err


def test_public_address_without_key_warns(caplog, monkeypatch) -> None:
    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    args = parse_args(DeployArgs, "deploy", "", ["--host", "0.0.0.0"])
    with caplog.at_level("WARNING", logger="tunesmith"):
        assert check_args(args) is None
    assert "without an API key" in caplog.text
    monkeypatch.setenv("TUNESMITH_API_KEY", "k")
    assert check_args(args) == "k"  # the variable is the key when --api_key is not given
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_root_names_cannot_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    inside = root / "team" / "bot"
    inside.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for d in (inside, outside):
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text("{}")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"")
    cat = Catalog("base", None, root=root.resolve())
    assert cat.names() == ["base", "team/bot"]
    for bad in ("../outside", str(outside), "link", "team/../../outside", "pickled", "team"):
        assert cat.lookup(bad) is None, bad
    found = cat.lookup("team/bot")
    assert found is not None and found[1].path == inside.resolve()
