"""Flag parsing: ms-swift commands parse unchanged, mistakes are one clear sentence."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs, SftArgs, arg, from_dict, to_dict
from tunesmith.utils import UserError

SFT_SELF_COGNITION = """swift sft --model Qwen2.5-7B-Instruct --train_type lora
--dataset self_cognition.json --torch_dtype bfloat16 --num_train_epochs 10
--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4
--lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16
--eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048
--output_dir output --system 'You are a helpful assistant.' --warmup_ratio 0.05
--dataloader_num_workers 4 --model_author swift --model_name swift-robot"""

SFT_MIXED = """swift sft --model Qwen/Qwen2.5-7B-Instruct --train_type lora
--dataset 'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500'
'swift/self-cognition#500' --torch_dtype bfloat16 --num_train_epochs 1
--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --learning_rate 1e-4
--lora_rank 8 --lora_alpha 32 --target_modules all-linear --gradient_accumulation_steps 16
--eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 --max_length 2048
--output_dir output --system 'You are a helpful assistant.' --warmup_ratio 0.05
--dataloader_num_workers 4 --model_author swift --model_name swift-robot"""

INFER_ADAPTERS = """swift infer --adapters output/vx-xxx/checkpoint-xxx --stream true
--temperature 0 --max_new_tokens 2048"""

INFER_MODEL = """swift infer --model Qwen2.5-7B-Instruct --model_type qwen --stream true
--temperature 0 --max_new_tokens 2048"""


def argv_of(command: str) -> list[str]:
    """The flags of an ms-swift command line, as ``tunesmith`` receives them."""
    words = shlex.split(command)
    assert words[0] == "swift"
    words[0] = "tunesmith"
    return words[2:]


def sft(argv: list[str]) -> SftArgs:
    return parse_args(SftArgs, "tunesmith sft", "test", argv)


def infer(argv: list[str]) -> InferCommandArgs:
    return parse_args(InferCommandArgs, "tunesmith infer", "test", argv)


# --- ms-swift seed commands -------------------------------------------------------------------


def test_self_cognition_sft_command_parses_with_typed_values() -> None:
    args = sft(argv_of(SFT_SELF_COGNITION))
    assert args.model == "Qwen2.5-7B-Instruct"
    assert args.train_type == "lora"
    assert args.dataset == ["self_cognition.json"]
    assert args.torch_dtype == "bfloat16"
    assert args.num_train_epochs == 10.0 and isinstance(args.num_train_epochs, float)
    assert args.learning_rate == pytest.approx(1e-4) and isinstance(args.learning_rate, float)
    assert args.warmup_ratio == pytest.approx(0.05)
    for name, value in [
        ("per_device_train_batch_size", 1),
        ("per_device_eval_batch_size", 1),
        ("lora_rank", 8),
        ("lora_alpha", 32),
        ("gradient_accumulation_steps", 16),
        ("eval_steps", 50),
        ("save_steps", 50),
        ("save_total_limit", 2),
        ("logging_steps", 5),
        ("max_length", 2048),
        ("dataloader_num_workers", 4),
    ]:
        got = getattr(args, name)
        assert got == value and type(got) is int, name
    assert args.target_modules == ["all-linear"]
    assert args.output_dir == "output"
    assert args.system == "You are a helpful assistant."
    assert args.model_author == ["swift"]
    assert args.model_name == ["swift-robot"]
    # Flags that were not given keep their defaults.
    assert args.packing is False
    assert args.max_steps == -1
    assert args.report_to == ["tensorboard"]


def test_mixed_dataset_sft_command_gives_three_datasets() -> None:
    args = sft(argv_of(SFT_MIXED))
    assert args.model == "Qwen/Qwen2.5-7B-Instruct"
    assert args.dataset == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "AI-ModelScope/alpaca-gpt4-data-en#500",
        "swift/self-cognition#500",
    ]
    assert args.num_train_epochs == 1.0
    assert args.gradient_accumulation_steps == 16


def test_tuner_type_is_an_alias_of_train_type() -> None:
    args = sft(["--tuner_type", "lora", "--dataset", "a.jsonl"])
    assert args.train_type == "lora"
    assert not any(f.name == "tuner_type" for f in dataclasses.fields(SftArgs))


def test_infer_with_adapters_command() -> None:
    args = infer(argv_of(INFER_ADAPTERS))
    assert args.adapters == ["output/vx-xxx/checkpoint-xxx"]
    assert args.stream is True
    assert args.temperature == 0.0 and isinstance(args.temperature, float)
    assert args.max_new_tokens == 2048 and type(args.max_new_tokens) is int
    assert args.model is None


def test_infer_with_model_command() -> None:
    args = infer(argv_of(INFER_MODEL))
    assert args.model == "Qwen2.5-7B-Instruct"
    assert args.model_type == "qwen"
    assert args.adapters == []
    assert args.stream is True
    assert args.temperature == 0.0
    assert args.max_new_tokens == 2048


def test_seed_vllm_command_parses() -> None:
    args = infer(
        ["--adapters", "ckpt", "--merge_lora", "true", "--infer_backend", "vllm",
         "--max_model_len", "8192", "--temperature", "0", "--max_new_tokens", "2048"]
    )  # fmt: skip
    assert args.infer_backend == "vllm" and args.max_model_len == 8192 and args.merge_lora
    assert args.gpu_memory_utilization == 0.9


@dataclasses.dataclass
class _Planned:
    """A command with one flag accepted for compatibility but not implemented yet."""

    later: str | None = arg(None, "a planned feature", todo="a later version")


def test_not_implemented_flags_are_refused(tmp_path) -> None:
    with pytest.raises(UserError, match="--later is not implemented yet"):
        parse_args(_Planned, "t", "", ["--later", "x"])
    assert parse_args(_Planned, "t", "", ["--later", "none"]).later is None  # the default
    cfg = tmp_path / "run.yaml"
    cfg.write_text("later: x\n", encoding="utf-8")
    with pytest.raises(UserError, match="not implemented yet"):
        parse_args(_Planned, "t", "", ["--config", str(cfg)])


def test_multi_gpu_flags_parse() -> None:
    args = sft(["--deepspeed", "zero3", "--fsdp", "full_shard auto_wrap"])
    assert (args.deepspeed, args.fsdp) == ("zero3", "full_shard auto_wrap")
    assert sft([]).deepspeed is None and sft([]).fsdp is None


# --- mistakes -------------------------------------------------------------------------------


def test_misspelled_flag_suggests_the_right_one() -> None:
    with pytest.raises(UserError) as e:
        sft(["--dataset", "a.jsonl", "--lora_rnak", "8"])
    msg = str(e.value)
    assert "--lora_rnak" in msg
    assert "--lora_rank" in msg


def test_bad_value_type_and_bad_choice() -> None:
    with pytest.raises(UserError, match="--lora_rank"):
        sft(["--lora_rank", "eight"])
    with pytest.raises(UserError, match="--torch_dtype"):
        sft(["--torch_dtype", "fp8"])


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("True", True)],
)
def test_booleans(text: str, value: bool) -> None:
    assert sft(["--packing", text]).packing is value
    assert infer(["--stream", text]).stream is value


@pytest.mark.parametrize("text", ["maybe", "2", "yess", ""])
def test_bad_boolean_is_an_error(text: str) -> None:
    with pytest.raises(UserError, match="--packing"):
        sft(["--packing", text])


def test_optional_values_accept_none() -> None:
    args = sft(["--save_total_limit", "none", "--gradient_checkpointing", "true"])
    assert args.save_total_limit is None
    assert args.gradient_checkpointing is True
    assert sft(["--gradient_checkpointing", "null"]).gradient_checkpointing is None


def test_negative_numbers_are_values_not_flags() -> None:
    assert sft(["--max_steps", "-1"]).max_steps == -1


# --- --config YAML --------------------------------------------------------------------------


def test_yaml_config_supplies_flags_and_command_line_wins(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: Qwen/Qwen2.5-7B-Instruct\n"
        "tuner_type: lora\n"
        "dataset:\n  - a.jsonl\n  - b.jsonl#10\n"
        "learning_rate: 1e-4\n"  # YAML 1.1 reads this as a string
        "lora_rank: 16\n"
        "packing: true\n"
        "save_total_limit: null\n"
        "model_name: 小智 XiaoZhi\n"
        "num_train_epochs: 2\n",
        encoding="utf-8",
    )
    args = sft(["--config", str(cfg), "--lora_rank", "4", "--packing", "false"])
    assert args.model == "Qwen/Qwen2.5-7B-Instruct"
    assert args.train_type == "lora"
    assert args.dataset == ["a.jsonl", "b.jsonl#10"]
    assert args.learning_rate == pytest.approx(1e-4) and isinstance(args.learning_rate, float)
    assert args.num_train_epochs == 2.0 and isinstance(args.num_train_epochs, float)
    assert args.model_name == ["小智", "XiaoZhi"]
    assert args.save_total_limit is None
    # The command line overrides the file.
    assert args.lora_rank == 4
    assert args.packing is False
    # Without the overrides, the file's values hold.
    only_file = sft(["--config", str(cfg)])
    assert only_file.lora_rank == 16 and only_file.packing is True


def test_yaml_unknown_key_names_the_nearest_flag(tmp_path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rnak: 8\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        sft(["--config", str(cfg)])
    msg = str(e.value)
    assert "lora_rnak" in msg and "lora_rank" in msg
    assert str(cfg) in msg


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("packing: maybe\n", "packing"),
        ("lora_rank: eight\n", "lora_rank"),
        ("torch_dtype: fp8\n", "torch_dtype"),
        ("- just\n- a list\n", "mapping"),
        ("model: [unclosed\n", "YAML"),
    ],
)
def test_yaml_bad_values(tmp_path, body: str, needle: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(body, encoding="utf-8")
    with pytest.raises(UserError, match=needle):
        sft(["--config", str(cfg)])


@pytest.mark.parametrize("value", ["8.5", "true"])
def test_yaml_non_integer_for_an_int_flag_is_an_error(tmp_path, value: str) -> None:
    with pytest.raises(UserError, match="--lora_rank"):
        sft(["--lora_rank", value])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"lora_rank: {value}\n", encoding="utf-8")
    with pytest.raises(UserError, match="lora_rank"):
        sft(["--config", str(cfg)])


def test_yaml_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="no such file"):
        sft(["--config", str(tmp_path / "nope.yaml")])


def test_args_round_trip_through_a_dict() -> None:
    args = sft(argv_of(SFT_MIXED))
    values = to_dict(args) | {"model_dir": "/somewhere", "run_dir": "/elsewhere"}
    assert from_dict(SftArgs, values) == args
    # An sft args.json feeds infer: shared fields carry over, the others are dropped.
    inf = from_dict(InferCommandArgs, values)
    assert inf.model == args.model and inf.system == args.system
    assert inf.max_length == args.max_length


# --- main() ---------------------------------------------------------------------------------


def _option_blocks(help_text: str) -> dict[str, str]:
    """``{'--flag': its help text}`` from an argparse help page."""
    body = help_text.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", "\n" + body)
    out = {}
    for block in blocks:
        block = block.strip()
        for name in re.findall(r"(--[a-z_0-9]+)", block.split("  ", 1)[0]):
            out[name] = " ".join(block.split())
    return out


@pytest.mark.parametrize(("command", "cls"), [("sft", SftArgs), ("infer", InferCommandArgs)])
def test_help_lists_every_flag_with_its_default(capsys, monkeypatch, command, cls) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    blocks = _option_blocks(capsys.readouterr().out)
    for f in dataclasses.fields(cls):
        flag = f"--{f.name}"
        assert flag in blocks, flag
        assert "(default:" in blocks[flag], flag
        for alias in f.metadata.get("aliases", ()):
            assert f"--{alias}" in blocks
        if f.metadata.get("todo"):
            assert "not implemented yet" in blocks[flag], flag
    assert "(default: 0.0001)" in blocks.get("--learning_rate", "") or cls is InferCommandArgs


def test_main_bad_flag_is_one_line_exit_2(capsys) -> None:
    assert main(["sft", "--lora_rnak", "8"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:")
    assert len(err.splitlines()) == 1
    assert "--lora_rank" in err
    assert "Traceback" not in captured.err + captured.out


def test_main_unknown_command_and_usage(capsys) -> None:
    assert main(["stf"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'stf'" in err and "'sft'" in err
    assert main([]) == 0
    assert "tunesmith sft" in capsys.readouterr().out
