"""Bad input to infer/export: one clear sentence, exit 2, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A LoRA checkpoint of the tiny model, saved by peft (no training needed here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    out = tmp_path_factory.mktemp("run") / "checkpoint-2"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_base(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A model of another shape (hidden 32 instead of 64) with the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    out = tmp_path_factory.mktemp("other") / "other-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_model_dir_without_tokenizer(tiny_model_dir, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare)
    code, err = run(capsys, "infer", "--model", str(bare), "--infer_backend", "pt")
    assert code == 2
    assert f"{bare}: no usable tokenizer" in err


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_adapter_of_another_base_is_one_sentence(adapter, other_base, capsys) -> None:
    argv = ["infer", "--model", str(other_base), "--adapters", str(adapter)]
    code, err = run(capsys, *argv, "--infer_backend", "pt")
    assert code == 2
    assert f"--adapters {adapter}: does not fit the base model" in err


def test_missing_checkpoint(tmp_path, capsys) -> None:
    code, err = run(capsys, "infer", "--adapters", str(tmp_path / "checkpoint-9"))
    assert code == 2
    assert "no such directory" in err


def test_partial_checkpoint_without_weights(adapter, tmp_path, capsys) -> None:
    partial = tmp_path / "checkpoint-2"
    partial.mkdir()
    shutil.copy(adapter / "adapter_config.json", partial)
    code, err = run(capsys, "infer", "--adapters", str(partial))
    assert code == 2
    assert "adapter weights (adapter_model.safetensors) are missing" in err


def test_run_dir_instead_of_checkpoint_suggests_the_checkpoint(adapter, capsys) -> None:
    code, err = run(capsys, "export", "--adapters", str(adapter.parent), "--merge_lora", "true")
    assert code == 2
    assert f"did you mean {adapter}?" in err
    assert not list(adapter.parent.glob("*-merged"))
