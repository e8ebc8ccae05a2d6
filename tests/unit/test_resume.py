"""Exact resume: stop after step 7 of 12, resume, and every loss equals the uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import parse_args
from tunesmith.config import SftArgs
from tunesmith.train.sft import sft
from tunesmith.utils import UserError

# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


def _data(path: Path) -> Path:
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 2)))}
        for i in range(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> SftArgs:
    # Batch 2 x accumulation 2: 5 steps an epoch, so step 7 stops in the middle of epoch 2,
    # and dropout makes the RNG state matter.
    argv = ["--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--max_steps", "12", "--save_steps", "7", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--lora_dropout", "0.1", "--learning_rate", "2e-3", "--warmup_steps", "2",
            "--torch_dtype", "float32", "--report_to", "none", *extra]  # fmt: skip
    return parse_args(SftArgs, "tunesmith sft", "test", argv)


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_resume_equals_uninterrupted_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    full = sft(_args(tiny_model_dir, data, tmp_path / "a"))
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-7"]

    # The same run as if killed after step 7: its directory holds only what existed then.
    cut = tmp_path / "b" / full.name
    cut.mkdir(parents=True)
    shutil.copytree(full / "checkpoint-7", cut / "checkpoint-7")
    shutil.copy(full / "args.json", cut / "args.json")
    kept = [ln for ln in (full / "logging.jsonl").read_text().splitlines() if ln.strip()][:7]
    (cut / "logging.jsonl").write_text("\n".join(kept) + "\n" + '{"step": 8, "loss": 9.9}\n')

    resumed = sft(_args(tiny_model_dir, data, tmp_path / "b", "--resume_from_checkpoint", "auto"))
    assert resumed == cut  # continues in the same run directory
    assert _losses(resumed) == _losses(full)  # all 12 losses, exactly
    final_a = load_file(full / "checkpoint-12" / "adapter_model.safetensors")
    final_b = load_file(resumed / "checkpoint-12" / "adapter_model.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_only_model_starts_a_new_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    first = sft(_args(tiny_model_dir, data, tmp_path / "out"))
    ckpt = first / "checkpoint-7"
    second = sft(
        _args(tiny_model_dir, data, tmp_path / "out", "--resume_from_checkpoint", str(ckpt),
              "--resume_only_model", "true", "--max_steps", "1", "--lora_dropout", "0")
    )  # fmt: skip
    assert second != first and second.parent == first.parent
    assert list(_losses(second)) == [1]


def test_resume_from_a_checkpoint_without_state_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    args = _args(tmp_path, tmp_path / "d.jsonl", tmp_path, "--resume_from_checkpoint", str(ckpt))
    _data(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="no optimizer/RNG state"):
        sft(args)


def test_early_stopping_keeps_the_best_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    # A huge learning rate makes the validation loss get worse after the first evaluations.
    args = _args(
        tiny_model_dir, data, tmp_path / "out", "--split_dataset_ratio", "0.2",
        "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1",
        "--early_stop_interval", "2", "--load_best_model_at_end", "true",
        "--learning_rate", "0.3", "--warmup_steps", "0", "--max_steps", "40",
    )  # fmt: skip
    run = sft(args)
    evals = [r for r in map(json.loads, (run / "logging.jsonl").read_text().splitlines())
             if "eval_loss" in r]  # fmt: skip
    losses = [r["eval_loss"] for r in evals]
    best_step = evals[losses.index(min(losses))]["step"]
    last_step = evals[-1]["step"]
    assert last_step < 40  # stopped early ...
    assert all(
        x >= min(losses) for x in losses[-2:]
    )  # ... after 2 evaluations without a better one
    kept = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert kept == sorted({best_step, last_step})  # rotation kept the best and the newest
    best = json.loads((run / "best_checkpoint.json").read_text())
    assert best["best_step"] == best_step and best["best_model_checkpoint"].endswith(
        f"checkpoint-{best_step}"
    )
    from tunesmith.model.adapters import check_adapter

    assert check_adapter(str(run)).name == f"checkpoint-{best_step}"


def test_save_only_model_checkpoints_cannot_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _data(tmp_path / "d.jsonl")
    run = sft(_args(tiny_model_dir, data, tmp_path / "o", "--save_only_model", "true",
                    "--max_steps", "2", "--save_steps", "2"))  # fmt: skip
    ckpt = run / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "training_state.safetensors").exists()
    with pytest.raises(UserError, match="--resume_only_model"):
        sft(_args(tiny_model_dir, data, tmp_path / "o", "--resume_from_checkpoint", str(ckpt)))


def test_full_fine_tuning_saves_hf_models_and_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _data(tmp_path / "d.jsonl")
    extra = ("--train_type", "full", "--max_steps", "4", "--save_steps", "2")
    full = sft(_args(tiny_model_dir, data, tmp_path / "a", *extra))
    ckpt = full / "checkpoint-4"
    tuned = AutoModelForCausalLM.from_pretrained(ckpt)  # a plain transformers directory
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(ckpt).chat_template
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # every weight trained

    cut = tmp_path / "b" / full.name
    cut.mkdir(parents=True)
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    shutil.copy(full / "args.json", cut / "args.json")
    resumed = sft(
        _args(tiny_model_dir, data, tmp_path / "b", *extra, "--resume_from_checkpoint", "auto")
    )
    assert [v for k, v in sorted(_losses(resumed).items()) if k > 2] == [
        v for k, v in sorted(_losses(full).items()) if k > 2
    ]
    again = load_file(resumed / "checkpoint-4" / "model.safetensors")
    first = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
