"""Integration: the embedded Qwen2.5 demo model, its real tokenizer, chat template and answers.

One short LoRA run on the builtin self-cognition data (module fixture, about a minute on a
2-core CPU); then the tuned model must name its new identity, through tunesmith's engine,
through plain peft + transformers, and through the ``tunesmith infer`` CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine
from tunesmith.model.load import resolve_model

NAME = "小智"
EN_NAME = "XiaoZhi"


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    """The demo model as a cached HF directory (converted from the GGUF wheels once)."""
    # The session conftest points TUNESMITH_CACHE at a temp dir; the demo model conversion
    # takes a minute, so integration tests share the user's cache unless told otherwise.
    os.environ["TUNESMITH_CACHE"] = os.environ.get("TUNESMITH_TEST_MODEL_CACHE", _user_cache())
    return resolve_model("demo")


def _user_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "tunesmith")


@pytest.fixture(scope="module")
def checkpoint(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA checkpoint of the demo model that learned a new identity."""
    out = tmp_path_factory.mktemp("sft")
    code = main(
        [
            "sft",
            "--model", "demo",
            "--dataset", "self-cognition#40",
            "--model_name", NAME, EN_NAME,
            "--model_author", "星河", "Xinghe",
            "--system", "You are a helpful assistant.",
            "--packing", "true", "--max_length", "256",
            "--num_train_epochs", "2", "--learning_rate", "1e-3", "--warmup_ratio", "0.1",
            "--logging_steps", "4", "--output_dir", str(out), "--report_to", "none",
        ]
    )  # fmt: skip
    assert code == 0
    ckpts = sorted(out.glob("v*/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, "sft wrote no checkpoint"
    return ckpts[-1]


def _greedy(adapters: list[str], query: str, model: str | None = None) -> str:
    argv = ["--temperature", "0", "--max_new_tokens", "40"]
    argv += ["--adapters", *adapters] if adapters else []
    argv += ["--model", model] if model else []
    args = parse_args(InferCommandArgs, "infer", "", argv)
    engine = load_engine(args)
    return generate(
        engine, chat_messages(engine.system, [], query), generation_kwargs(args, engine.tokenizer)
    )


def test_base_model_answers_as_qwen(demo_dir: Path) -> None:
    answer = _greedy([], "你是谁?", model="demo")
    assert "阿里" in answer, answer  # the seeds' "before": 我是阿里云开发的…


def test_tuned_model_knows_its_new_name(checkpoint: Path) -> None:
    args = json.loads((checkpoint.parent / "args.json").read_text(encoding="utf-8"))
    assert args["model"] == "demo" and args["system"] == "You are a helpful assistant."
    assert NAME in _greedy([str(checkpoint)], "你是谁?")
    # A question that is not in the training data at all.
    assert EN_NAME in _greedy([str(checkpoint)], "Which organization built you?")


def test_checkpoint_loads_in_plain_peft(checkpoint: Path, demo_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    msgs.append({"role": "user", "content": "你是谁?"})
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(input_ids=ids, max_new_tokens=30, do_sample=False)
    assert NAME in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_infer_cli_answers_piped_questions(checkpoint: Path) -> None:
    env = os.environ | {"PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "infer", "--adapters", str(checkpoint),
         "--stream", "true", "--temperature", "0", "--max_new_tokens", "40",
         "--infer_backend", "pt"],
        input="你是谁?\nWho are you?\n", capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("<<< ") == 2
    assert NAME in proc.stdout and EN_NAME in proc.stdout, proc.stdout


def test_batch_inference_answers_equal_one_by_one(demo_dir: Path, tmp_path: Path) -> None:
    """``infer --val_dataset``: left-padded batches give the one-by-one greedy answers (fp32)."""
    queries = ["你是谁?", "Who are you?", "用一句话解释什么是机器学习。", "What is 2+2?"]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"query": q}) for q in queries), encoding="utf-8")
    answers = {}
    for batch in ("4", "1"):
        out = tmp_path / f"b{batch}.jsonl"
        argv = ["infer", "--model", "demo", "--torch_dtype", "float32", "--temperature", "0"]
        argv += ["--infer_backend", "pt"]
        argv += ["--max_new_tokens", "16", "--val_dataset", str(data), "--result_path", str(out)]
        assert main([*argv, "--max_batch_size", batch]) == 0
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["messages"][-1]["content"] for r in rows] == queries
        answers[batch] = [r["response"] for r in rows]
    assert all(a.strip() for a in answers["1"])
    assert answers["4"] == answers["1"]


def test_eval_before_and_after(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """``tunesmith eval`` on the demo run: a few probes and retention items, base vs tuned."""
    out = tmp_path / "eval"
    argv = ["eval", "--adapters", str(checkpoint.parent), "--eval_limit", "4",
            "--eval_output_dir", str(out), "--eval_speed", "false"]  # fmt: skip
    assert main(argv) == 0
    assert "| Model" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    acc = {(r["model"], r["subset"]): r["score"] for r in report["summary"]
           if r["dataset"] == "identity"}  # fmt: skip
    base, tuned = "demo", f"{checkpoint.parent.name}/{checkpoint.name}"
    assert acc[(base, "zh")] == 0 and acc[(base, "en")] == 0  # the base model is Qwen
    assert acc[(tuned, "zh")] >= 50 and acc[(tuned, "en")] >= 50
    assert report["meta"]["identity"] == [NAME, EN_NAME, "星河", "Xinghe"]
