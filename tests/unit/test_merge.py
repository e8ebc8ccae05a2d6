"""Merging LoRA into the base: the merged model equals base + adapter, and loads anywhere."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main

# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


def test_merged_logits_equal_base_plus_adapter(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    argv = ["export", "--adapters", str(checkpoint), "--merge_lora", "true"]
    assert main([*argv, "--output_dir", str(out), "--torch_dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and (out / "generation_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, checkpoint).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Echo 3."}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something
    kw = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(merged.generate(ids, **kw), adapted.generate(ids, **kw))


def test_infer_merge_lora_writes_a_merged_dir_and_answers(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo 1.\n"))
    argv = ["infer", "--adapters", str(checkpoint), "--merge_lora", "true", "--temperature", "0"]
    assert main([*argv, "--max_new_tokens", "4", "--torch_dtype", "float32"]) == 0
    assert (checkpoint.parent / "checkpoint-4-merged" / "config.json").is_file()
    assert capsys.readouterr().out.count("<<< ") == 1


def test_export_to_an_unwritable_place_is_one_clear_error(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"  # a file where a folder should be: not writable as a folder
    blocker.write_text("x")
    code = main(["export", "--adapters", str(checkpoint), "--merge_lora", "true",
                 "--output_dir", str(blocker / "merged")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "error: could not write the merged model" in err
    assert "Traceback" not in err and blocker.read_text() == "x"


def test_export_needs_merge_lora(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--adapters", str(checkpoint)]) == 2
    assert "--merge_lora true" in capsys.readouterr().err
