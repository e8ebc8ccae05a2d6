"""``tunesmith infer`` on a checkpoint of a tiny sft run: loading, errors, generation, CLI."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs, SftArgs
from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine
from tunesmith.model.adapters import check_adapter
from tunesmith.model.load import resolve_dtype
from tunesmith.train.sft import sft
from tunesmith.utils import UserError

SYSTEM = "You are a test bot."


# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("infer-run")
    data = tmp / "train.jsonl"
    records = [
        {"instruction": f"Say {w}.", "output": f"{w}! {w}!"} for w in ("hello", "world", "yes")
    ]
    data.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", str(data), "--max_steps", "2",
        "--save_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp / "out"),
        "--torch_dtype", "float32", "--report_to", "none", "--system", SYSTEM,
        "--learning_rate", "1e-3",
    ]  # fmt: skip
    return sft(parse_args(SftArgs, "tunesmith sft", "test", argv))


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    path = run_dir / "checkpoint-2"
    assert (path / "adapter_config.json").is_file()
    return path


def infer_args(*argv: str) -> InferCommandArgs:
    return parse_args(InferCommandArgs, "tunesmith infer", "test", list(argv))


@pytest.fixture(scope="module")
def engine(ckpt):
    """The engine exactly as ``tunesmith infer --adapters CKPT`` loads it: no other flag."""
    return load_engine(infer_args("--adapters", str(ckpt)))


def test_engine_takes_the_base_model_and_system_from_args_json(engine, tiny_model_dir) -> None:
    from peft import PeftModel

    assert isinstance(engine.model, PeftModel)
    base = engine.model.get_base_model()
    assert Path(base.config._name_or_path).resolve() == Path(tiny_model_dir).resolve()
    assert engine.system == SYSTEM
    assert engine.tokenizer.chat_template
    assert not engine.model.training
    assert engine.model.dtype == resolve_dtype("auto", engine.device.type)
    # The adapter is applied: the outputs differ from the plain base model's.
    ids = torch.tensor([engine.tokenizer("Say hello.")["input_ids"]], device=engine.device)
    with torch.no_grad():
        tuned = engine.model(input_ids=ids).logits.float()
        with engine.model.disable_adapter():
            plain = engine.model(input_ids=ids).logits.float()
    assert (tuned - plain).abs().max() > 1e-3


def test_system_flag_overrides_the_recorded_one(ckpt) -> None:
    eng = load_engine(infer_args("--adapters", str(ckpt), "--system", "Other."))
    assert eng.system == "Other."


def test_check_adapter_errors(run_dir, ckpt, tmp_path) -> None:
    assert check_adapter(str(ckpt)) == ckpt
    with pytest.raises(UserError, match="no such directory"):
        check_adapter(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="adapter_config") as e:
        check_adapter(str(empty))
    assert "did you mean" not in str(e.value)
    # Given the run directory, the checkpoint inside it is suggested.
    with pytest.raises(UserError, match="adapter_config") as e:
        check_adapter(str(run_dir))
    assert f"did you mean {ckpt}?" in str(e.value)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="adapter_model"):
        check_adapter(str(no_weights))


def test_check_adapter_suggests_the_newest_checkpoint(tmp_path) -> None:
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_config.json").write_text("{}", "utf-8")
    with pytest.raises(UserError) as e:
        check_adapter(str(tmp_path))
    assert f"did you mean {tmp_path / 'checkpoint-10'}?" in str(e.value)


def test_load_engine_without_adapter_config(run_dir) -> None:
    with pytest.raises(UserError, match="adapter_config"):
        load_engine(infer_args("--adapters", str(run_dir)))


def test_greedy_generation_is_deterministic(ckpt) -> None:
    engine = load_engine(infer_args("--adapters", str(ckpt), "--torch_dtype", "float32"))
    assert engine.model.dtype == torch.float32
    gen = generation_kwargs(
        infer_args("--temperature", "0", "--max_new_tokens", "8"), engine.tokenizer
    )
    assert gen["do_sample"] is False and gen["max_new_tokens"] == 8
    messages = chat_messages(engine.system, [], "Say hello.")
    assert messages[0] == {"role": "system", "content": SYSTEM}
    first = generate(engine, messages, gen)
    torch.manual_seed(1234)  # greedy decoding does not depend on the RNG
    second = generate(engine, messages, gen)
    assert first == second
    # Temperature 0 is plain greedy decoding: argmax step by step until <|im_end|>.
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(engine.model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert first == tok.decode(new, skip_special_tokens=True)
    # Streaming writes the same answer.
    out = io.StringIO()
    assert generate(engine, messages, gen, out) == first
    assert out.getvalue().rstrip("\n") == first.rstrip("\n")


def test_cli_answers_each_piped_line(ckpt, engine, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hello.\n\nSay world.\n"))
    argv = ["infer", "--adapters", str(ckpt), "--temperature", "0", "--max_new_tokens", "5"]
    code = main([*argv, "--infer_backend", "pt"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("<<< ") == 2
    first_q, second_q = out.index("<<< Say hello.\n"), out.index("<<< Say world.\n")
    assert first_q == 0 and second_q > first_q
    # The answers are those of the engine (same checkpoint, greedy decoding).
    gen = generation_kwargs(
        infer_args("--temperature", "0", "--max_new_tokens", "5"), engine.tokenizer
    )
    for query, block in zip(("Say hello.", "Say world."), out.split("<<< ")[1:], strict=True):
        expected = generate(engine, chat_messages(SYSTEM, [], query), gen)
        assert expected.strip()
        assert block.startswith(f"{query}\n")
        assert block[len(query) + 1 :].strip("\n") == expected.strip("\n")


def test_cli_non_streaming(ckpt, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Say yes.\n"))
    argv = ["infer", "--adapters", str(ckpt), "--temperature", "0", "--max_new_tokens", "3"]
    assert main([*argv, "--stream", "false", "--infer_backend", "pt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<<< Say yes.\n") and out.endswith("\n\n")


def test_cli_bad_adapter_is_one_line(tmp_path, capsys) -> None:
    assert main(["infer", "--adapters", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "adapter_config.json" in err
    assert len(err.splitlines()) == 1


def test_relative_model_path_still_found_from_another_directory(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = work / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi!"}), encoding="utf-8")
    monkeypatch.chdir(work)
    relative = os.path.relpath(tiny_model_dir, work)
    argv = ["--model", relative, "--dataset", "train.jsonl", "--max_steps", "1"]
    argv += ["--output_dir", "out", "--torch_dtype", "float32", "--report_to", "none"]
    run = sft(parse_args(SftArgs, "tunesmith sft", "test", argv))
    ckpt = (work / run / "checkpoint-1").resolve()
    elsewhere = tmp_path / "a" / "b" / "c"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    engine = load_engine(infer_args("--adapters", str(ckpt)))
    assert (
        Path(engine.model.get_base_model().config._name_or_path).resolve()
        == Path(tiny_model_dir).resolve()
    )
