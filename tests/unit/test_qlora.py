"""QLoRA flags: the bitsandbytes config they build, one-sentence refusals, ``--lora_dtype``.

The 4-bit training path itself needs a CUDA GPU and bitsandbytes (``bench/gpu_train.py`` runs
it); everything here runs on a CPU without bitsandbytes.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import main, parse_args
from tunesmith.config import SftArgs, to_dict
from tunesmith.model.quant import bnb_config_from, param_counts, recorded_bnb_config
from tunesmith.options import quant_options
from tunesmith.train.sft import sft
from tunesmith.utils import UserError

pytestmark = pytest.mark.usefixtures("isolated_torch")


def sft_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
        "--max_steps", "4", "--save_steps", "4", "--logging_steps", "1",
        "--torch_dtype", "float32", "--learning_rate", "1e-2", "--report_to", "none",
        "--lora_dropout", "0", *extra,
    ]  # fmt: skip


@contextmanager
def log_lines() -> Iterator[io.StringIO]:
    """What tunesmith logs inside the block (pytest's own capture handlers stay as they are)."""
    log = logging.getLogger("tunesmith")
    handler, level = logging.StreamHandler(io.StringIO()), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.stream
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def parse(*argv: str) -> SftArgs:
    return parse_args(SftArgs, "tunesmith sft", "test", list(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora-data") / "train.jsonl"
    rows = [
        {"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in (3, 5)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# --- the BitsAndBytesConfig the flags build ---------------------------------------------------


def test_4bit_defaults_are_nf4_double_quant_in_the_run_dtype() -> None:
    args = parse("--quantization_bit", "4")
    cfg = bnb_config_from(quant_options(args), torch.bfloat16)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_flags_reach_the_config() -> None:
    args = parse(
        "--quant_bits", "4", "--bnb_4bit_quant_type", "fp4",
        "--bnb_4bit_use_double_quant", "false", "--bnb_4bit_compute_dtype", "float16",
    )  # fmt: skip
    assert args.quantization_bit == 4  # --quant_bits is ms-swift 3's name
    cfg = bnb_config_from(quant_options(args), torch.bfloat16)
    assert cfg.bnb_4bit_quant_type == "fp4"
    assert cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16


def test_8bit_and_off() -> None:
    cfg = bnb_config_from(quant_options(parse("--quantization_bit", "8")), torch.bfloat16)
    assert cfg.load_in_8bit and not cfg.load_in_4bit
    assert bnb_config_from(quant_options(parse()), torch.bfloat16) is None


def test_bad_quant_type_is_refused_by_the_parser() -> None:
    with pytest.raises(UserError, match="bnb_4bit_quant_type"):
        parse("--quantization_bit", "4", "--bnb_4bit_quant_type", "int4")


def test_infer_reuses_the_recorded_quantization_only_where_it_can() -> None:
    recorded = to_dict(parse("--quantization_bit", "4", "--bnb_4bit_quant_type", "fp4"))
    with log_lines() as out:
        assert recorded_bnb_config(to_dict(parse()), torch.bfloat16, "cuda") is None
    assert out.getvalue() == ""
    # This machine has no CUDA: the base loads unquantized, with a note that says why.
    with log_lines() as out:
        assert recorded_bnb_config(recorded, torch.float32, "cpu") is None
    assert "trained on a 4-bit base" in out.getvalue() and "unquantized" in out.getvalue()


# --- refusals: one sentence, exit 2, nothing written --------------------------------------------


def _refused(capsys, argv: list[str], out: Path) -> str:
    assert main(["sft", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # no run directory, not even the output dir
    return err


def test_qlora_without_cuda_says_so(tiny_model_dir, data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    err = _refused(capsys, sft_argv(tiny_model_dir, data, out, "--quantization_bit", "4"), out)
    assert "--quantization_bit 4 needs a CUDA GPU" in err
    assert "drop the flag" in err


def test_qlora_without_bitsandbytes_gives_the_install_command(
    tiny_model_dir, data, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    out = tmp_path / "out"
    err = _refused(capsys, sft_argv(tiny_model_dir, data, out, "--quantization_bit", "8"), out)
    assert "bitsandbytes" in err and "pip install 'tunesmith[qlora]'" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--quantization_bit", "3"], "--quantization_bit must be 4 or 8"),
        (["--quantization_bit", "4", "--train_type", "full"], "--train_type full"),
        (["--lora_dtype", "bfloat16", "--train_type", "full"], "--lora_dtype"),
        (["--lora_dtype", "float16", "--torch_dtype", "float16"], "--lora_dtype float16"),
        (["--lora_dtype", "int8"], "--lora_dtype"),
    ],
)
def test_bad_combinations_are_one_sentence(
    tiny_model_dir, data, tmp_path, capsys, extra, needle
) -> None:
    out = tmp_path / "out"
    err = _refused(capsys, [*sft_argv(tiny_model_dir, data, out), *extra], out)
    assert needle in err


# --- --lora_dtype --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_lora_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-bf16")
    return sft(parse(*sft_argv(tiny_model_dir, data, out, "--lora_dtype", "bfloat16")))


@pytest.mark.slow  # trains the tiny model
def test_lora_dtype_bf16_saves_bf16_weights_and_trains(bf16_lora_run) -> None:
    weights = load_file(bf16_lora_run / "checkpoint-4" / "adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.bfloat16}
    # lora_B starts at zero: non-zero now means the optimizer updated the bf16 weights.
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and all(w.abs().sum() > 0 for w in b)
    log = [json.loads(x) for x in (bf16_lora_run / "logging.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    args = json.loads((bf16_lora_run / "args.json").read_text(encoding="utf-8"))
    assert args["lora_dtype"] == "bfloat16" and args["quantization_bit"] == 0


@pytest.mark.slow  # trains the tiny model
def test_lora_dtype_bf16_adapter_loads_in_plain_peft(tiny_model_dir, bf16_lora_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, bf16_lora_run / "checkpoint-4").eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)


def test_param_counts_of_a_plain_model(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.lm_head.weight.requires_grad_(False)
    trainable, total = param_counts(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == total - model.lm_head.weight.numel()


@pytest.mark.slow  # trains the tiny model
def test_a_qlora_checkpoint_still_loads_for_infer_on_a_cpu(bf16_lora_run, tmp_path) -> None:
    """A run recorded as 4-bit (as on a GPU) loads here unquantized, with the note."""
    import shutil

    from tunesmith.config import InferCommandArgs
    from tunesmith.infer.engine import load_engine

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(bf16_lora_run / "checkpoint-4", ckpt)
    recorded = json.loads((ckpt / "args.json").read_text(encoding="utf-8"))
    recorded["quantization_bit"] = 4
    (ckpt / "args.json").write_text(json.dumps(recorded), encoding="utf-8")
    args = parse_args(InferCommandArgs, "tunesmith infer", "test", ["--adapters", str(ckpt)])
    with log_lines() as out:
        engine = load_engine(args)
    assert "trained on a 4-bit base" in out.getvalue()
    assert engine.model.peft_config["default"].r == 8
