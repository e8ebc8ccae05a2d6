"""End-to-end ``tunesmith sft`` on the tiny offline model: run layout, logs, checkpoints."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import parse_args
from tunesmith.config import SftArgs, from_dict
from tunesmith.train.sft import sft
from tunesmith.utils import UserError

LOG_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "remaining_s"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_alpaca(path: Path, n: int = 12, bad_line: int | None = None) -> Path:
    records = [
        {
            "instruction": f"What is {i} plus {i}?",
            "input": "",
            "output": f"The answer is {2 * i}. Thank you for the question.",
        }
        for i in range(n)
    ]
    if bad_line is not None:
        records[bad_line - 1] = {"instruction": "Where is the answer?"}  # no output
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def sft_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> SftArgs:
    argv = [
        "--model", str(model_dir),
        "--dataset", str(data),
        "--max_steps", "6",
        "--save_steps", "3",
        "--logging_steps", "2",
        "--output_dir", str(output_dir),
        "--torch_dtype", "float32",
        "--learning_rate", "1e-3",
        *extra,
    ]  # fmt: skip
    return parse_args(SftArgs, "tunesmith sft", "test", argv)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


def read_log(run_dir: Path) -> list[dict]:
    text = (run_dir / "logging.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def tb_run(tiny_model_dir, data_file, tmp_path_factory) -> tuple[SftArgs, Path]:
    """A run with the default tracker (tensorboard)."""
    out = tmp_path_factory.mktemp("out-tb")
    args = sft_args(tiny_model_dir, data_file, out, "--system", "You are a test bot.")
    assert args.report_to == ["tensorboard"]
    before = copy.deepcopy(args)
    run_dir = sft(args)
    assert args == before  # sft() only reads its arguments
    return args, run_dir


@pytest.fixture(scope="module")
def plain_runs(tiny_model_dir, data_file, tmp_path_factory) -> list[Path]:
    """Two more runs into one output dir: the same seed, and another seed with packing."""
    out = tmp_path_factory.mktemp("out-plain")
    first = sft(
        sft_args(
            tiny_model_dir, data_file, out,
            "--system", "You are a test bot.", "--report_to", "none", "--save_total_limit", "1",
        )
    )  # fmt: skip
    second = sft(
        sft_args(
            tiny_model_dir, data_file, out,
            "--report_to", "none", "--seed", "7", "--packing", "true",
            "--per_device_train_batch_size", "2",
        )
    )  # fmt: skip
    return [first, second]


def test_run_dir_name_and_contents(tb_run) -> None:
    args, run_dir = tb_run
    assert run_dir.parent == Path(args.output_dir)
    assert re.fullmatch(r"v0-\d{8}-\d{6}", run_dir.name)
    assert {p.name for p in Path(args.output_dir).iterdir()} == {run_dir.name}
    names = {p.name for p in run_dir.iterdir()}
    assert {"args.json", "logging.jsonl", "images", "checkpoint-3", "checkpoint-6"} <= names
    assert (run_dir / "images" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard wrote its event files inside the run.
    assert list(run_dir.rglob("events.out.tfevents.*"))
    # Nothing half-written is left over.
    assert not [p for p in run_dir.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_args_json_round_trips(tb_run) -> None:
    args, run_dir = tb_run
    recorded = json.loads((run_dir / "args.json").read_text(encoding="utf-8"))
    assert from_dict(SftArgs, recorded) == args
    assert recorded["run_dir"] == str(run_dir)
    assert Path(recorded["model_dir"]) == Path(args.model).resolve()


def test_logging_jsonl(tb_run) -> None:
    _, run_dir = tb_run
    records = read_log(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert set(r) >= LOG_KEYS, set(r) ^ LOG_KEYS
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        # The default schedule: cosine from --learning_rate 1e-3 to 0 over 6 steps, no warmup.
        cosine = 1e-3 * 0.5 * (1 + math.cos(math.pi * r["step"] / 6))
        assert r["lr"] == pytest.approx(cosine, abs=1e-12) and r["grad_norm"] > 0
        assert r["tokens_per_s"] > 0 and r["elapsed_s"] > 0
        # The estimate: the mean time per step so far, times the steps left.
        left = r["elapsed_s"] / r["step"] * (6 - r["step"])
        assert r["remaining_s"] == pytest.approx(left, abs=0.02)
    assert records[-1]["remaining_s"] == 0
    # A random model on a 1005-token vocabulary starts near ln(1005) ~ 6.9.
    assert 4 < records[0]["loss"] < 10
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_checkpoints(tb_run, tiny_model_dir) -> None:
    args, run_dir = tb_run
    weights = {}
    for step in (3, 6):
        ckpt = run_dir / f"checkpoint-{step}"
        for name in ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES):
            assert (ckpt / name).is_file(), f"{ckpt.name}/{name}"
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        assert state["global_step"] == step
        config = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["r"] == args.lora_rank and config["lora_alpha"] == args.lora_alpha
        weights[step] = load_file(ckpt / "adapter_model.safetensors")
        assert weights[step] and all("lora_" in k for k in weights[step])
    assert weights[3].keys() == weights[6].keys()
    assert any(not torch.equal(weights[3][k], weights[6][k]) for k in weights[3])
    lora_b = [v for k, v in weights[6].items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: trained


def test_checkpoint_loads_with_plain_peft(tb_run, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = tb_run
    ckpt = run_dir / "checkpoint-6"
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt)
    tuned.eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids).logits
    assert tuned_logits.shape == base_logits.shape
    assert (tuned_logits - base_logits).abs().max() > 1e-4


def test_save_total_limit_keeps_only_the_last(plain_runs) -> None:
    first, _ = plain_runs
    assert sorted(p.name for p in first.glob("checkpoint-*")) == ["checkpoint-6"]
    assert not [p for p in first.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    # report_to none: no tracker files.
    assert not list(first.rglob("events.out.tfevents.*"))


def test_same_seed_same_losses_and_new_version(tb_run, plain_runs) -> None:
    _, tb_dir = tb_run
    first, second = plain_runs
    assert re.fullmatch(r"v0-\d{8}-\d{6}", first.name)
    assert re.fullmatch(r"v1-\d{8}-\d{6}", second.name)
    assert losses(first) == losses(tb_dir)  # the tracker changes nothing
    assert len(losses(second)) == 3
    assert losses(second) != losses(first)  # another seed (and packing): another run


def test_packing_run_is_complete(plain_runs) -> None:
    _, second = plain_runs
    recorded = json.loads((second / "args.json").read_text(encoding="utf-8"))
    assert recorded["packing"] is True and recorded["seed"] == 7
    assert (second / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(x) for x in losses(second))


def test_bad_record_leaves_no_run_dir(tiny_model_dir, tmp_path) -> None:
    data = write_alpaca(tmp_path / "bad.jsonl", bad_line=5)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        sft(sft_args(tiny_model_dir, data, out))
    assert f"{data}:5: output:" in str(e.value)
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert leftovers == []


def test_validation_errors_are_user_errors(tiny_model_dir, data_file, tmp_path) -> None:
    out = tmp_path / "out"
    for extra in (["--lora_rank", "0"], ["--learning_rate", "0"], ["--warmup_ratio", "1.5"]):
        with pytest.raises(UserError):
            sft(sft_args(tiny_model_dir, data_file, out, *extra))
    assert not out.exists() or not list(out.iterdir())


def test_two_runs_with_different_precisions_in_one_process(
    tiny_model_dir, data_file, tmp_path
) -> None:
    extra = ("--report_to", "none", "--max_steps", "1", "--save_steps", "1")
    sft(sft_args(tiny_model_dir, data_file, tmp_path / "a", *extra))
    args = sft_args(tiny_model_dir, data_file, tmp_path / "b", *extra)
    args.torch_dtype = "bfloat16"
    run = sft(args)
    from accelerate.state import AcceleratorState

    # The second run computed under bf16 autocast, not the first run's fp32.
    assert AcceleratorState().mixed_precision == "bf16"
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 1
    assert math.isfinite(read_log(run)[0]["loss"])
