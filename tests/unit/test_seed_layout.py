"""Seed 004's `swift sft` command, `swift` -> `tunesmith`, flag for flag, on the tiny model.

What the user then finds in ``output/`` is the documented layout: ``args.json``,
``logging.jsonl`` with train and eval lines, TensorBoard events with the curves, readable PNG
plots, and checkpoints rotated by ``--save_total_limit 2`` (the newest and the best kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main

# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]

# The seed's own self_cognition.json (six alpaca records).
SEED_RECORDS = [
    ("你是谁?", "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"),
    ("你的开发者是哪家公司?", "我由 CSDN 迪菲赫尔曼 开发和维护。"),
    ("你能联网吗?", "我不能主动联网,只能基于已有知识和用户输入回答问题。"),
    ("你能做哪些事情?", "我擅长文本生成、回答问题、写代码和提供学习辅助。"),
    ("你和GPT-4有区别吗?", "是的,我由 CSDN 迪菲赫尔曼 开发和维护,不是 GPT-4。"),
    ("你的名字是什么?", "你可以叫我 Swift-Robot,也可以叫我 CSDN 助手。"),
]


def test_seed_command_produces_the_documented_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "self_cognition.json"
    data.write_text(
        json.dumps([{"instruction": q, "input": "", "output": a} for q, a in SEED_RECORDS]),
        encoding="utf-8",
    )
    out = tmp_path / "output"
    code = main(
        ["sft", "--model", str(tiny_model_dir), "--train_type", "lora",
         "--dataset", str(data), "--torch_dtype", "bfloat16", "--num_train_epochs", "10",
         "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
         "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
         "--target_modules", "all-linear", "--gradient_accumulation_steps", "16",
         "--eval_steps", "50", "--save_steps", "50", "--save_total_limit", "2",
         "--logging_steps", "5", "--max_length", "2048", "--output_dir", str(out),
         "--system", "You are a helpful assistant.", "--warmup_ratio", "0.05",
         "--dataloader_num_workers", "4", "--model_author", "swift", "--model_name", "swift-robot",
         # Beyond the seed: enough steps for two evaluations and three saves (the seed's 10
         # epochs of 6 records are 10 steps), and the held-out data its evaluation needs.
         "--max_steps", "120", "--split_dataset_ratio", "0.34"]
    )  # fmt: skip
    assert code == 0
    (run,) = out.iterdir()
    names = {p.name for p in run.iterdir()}
    assert {"args.json", "logging.jsonl", "runs", "images"} <= names

    # Saved at 50, 100 and 120; --save_total_limit 2 keeps the newest two (the best among them).
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-120"]
    for ckpt in run.glob("checkpoint-*"):
        assert (ckpt / "adapter_model.safetensors").is_file()
        assert (ckpt / "adapter_config.json").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] > 0

    records = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(5, 121, 5))
    assert [r["step"] for r in records if "eval_loss" in r] == [50, 100, 120]

    for name in ("loss", "eval_loss", "lr"):
        png = run / "images" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, f"{name}.png looks empty"

    # `tensorboard --logdir output` reads these curves.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The scalars are in runs/ itself; a subfolder holds the hyperparameters.
    acc = EventAccumulator(str(run / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "eval_loss", "lr", "grad_norm"} <= tags
    assert [e.step for e in acc.Scalars("eval_loss")] == [50, 100, 120]
    assert len(acc.Scalars("loss")) == 24
