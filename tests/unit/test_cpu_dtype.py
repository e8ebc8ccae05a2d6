"""Dtype sense on CPU: an explicit bf16 without native bf16 matmul is warned about, once."""

from __future__ import annotations

import pytest
import torch

from tunesmith.model import load


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(load.logger, "info", lines.append)
    monkeypatch.setattr(load, "_warned", set())
    return lines


def test_explicit_bf16_without_native_bf16_warns_once(
    monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert load.resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # kept: the user asked
    assert load.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert len(said) == 1
    assert "--torch_dtype float32" in said[0] and "slower" in said[0]
    assert load.resolve_dtype("auto", "cpu") is torch.float32  # auto avoids it, silently
    assert len(said) == 1


def test_no_warning_with_native_bf16_on_gpus_or_for_conversions(
    monkeypatch: pytest.MonkeyPatch, said: list[str]
) -> None:
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True)
    assert load.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert load.resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert load.resolve_dtype("bfloat16", "cuda") is torch.bfloat16
    assert load.resolve_dtype("bfloat16", "cpu", compute=False) is torch.bfloat16
    assert load.resolve_dtype("float32", "cpu") is torch.float32
    assert said == []
