"""The vLLM backend's CPU-side logic: install hint, adapter checks, sampling settings.

vLLM itself needs a CUDA GPU and is not installed in CI; what it is given is tested here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunesmith.infer import vllm_backend as vb
from tunesmith.utils import UserError


def _adapter(tmp_path: Path, **cfg) -> Path:
    d = tmp_path / "checkpoint-3"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, **cfg}))
    return d


def _args(**kw):
    base = dict(temperature=None, top_p=None, top_k=None, repetition_penalty=None)
    return SimpleNamespace(**(base | {"max_new_tokens": 64, "seed": 7} | kw))


def test_missing_vllm_is_one_sentence_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError, match=r"tunesmith\[vllm\]"):
        vb.import_vllm()


@pytest.mark.parametrize(("rank", "expected"), [(4, 8), (8, 8), (12, 16), (64, 64), (200, 256)])
def test_lora_rank_rounds_up_to_a_size_vllm_has(tmp_path, rank, expected) -> None:
    assert vb.lora_rank_for_vllm(_adapter(tmp_path, r=rank)) == expected


@pytest.mark.parametrize(
    ("cfg", "flag"),
    [({"use_dora": True}, "--use_dora"), ({"modules_to_save": ["lm_head"]}, "--modules_to_save")],
)
def test_adapters_vllm_cannot_apply_are_refused_with_the_merge_command(tmp_path, cfg, flag) -> None:
    with pytest.raises(UserError, match=rf"{flag}.*--merge_lora true"):
        vb.lora_rank_for_vllm(_adapter(tmp_path, **cfg))


def test_rank_above_vllms_maximum_is_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="maximum"):
        vb.lora_rank_for_vllm(_adapter(tmp_path, r=1024))


def test_generation_config_gives_the_defaults(tmp_path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05})
    )
    assert vb.generation_defaults(tmp_path) == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
    assert vb.generation_defaults(tmp_path / "missing") == {}


def test_flags_override_defaults_and_temperature_zero_is_greedy() -> None:
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    kw = vb.sampling_kwargs(_args(top_p=0.5), defaults)
    assert kw == {"temperature": 0.7, "top_p": 0.5, "top_k": 20, "max_tokens": 64, "seed": 7}
    assert vb.sampling_kwargs(_args(temperature=0.0), defaults) == {
        "temperature": 0.0,
        "max_tokens": 64,
        "seed": 7,
    }


def test_cli_without_vllm_exits_2_before_loading_anything(
    tiny_model_dir: Path, monkeypatch, capsys
) -> None:
    from tunesmith.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["infer", "--model", str(tiny_model_dir), "--infer_backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--infer_backend vllm needs vLLM" in err and "Traceback" not in err
