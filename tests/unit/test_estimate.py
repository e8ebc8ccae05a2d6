"""``tunesmith estimate``: shape reading and the memory terms (CPU only, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.model.estimate import EstimateArgs, Shape, estimate, load_shape

QWEN7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)  # fmt: skip


def test_shape_from_a_local_config_matches_the_known_parameter_count(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B | {"tie_word_embeddings": False}))
    shape = load_shape(EstimateArgs(model=str(tmp_path)))
    linear, other = shape.params()
    assert abs((linear + other) / 1e9 - 7.615) < 0.01  # Qwen2.5-7B: 7.62B parameters


def test_terms_follow_the_flags() -> None:
    shape = Shape(3584, 18944, 28, 28, 4, 152064, False)
    base = estimate(shape, EstimateArgs())
    # 14.19 GiB of bf16 weights less the untied input embedding, kept in host memory (1.02).
    assert base["weights"] == pytest.approx(13.17, abs=0.01)
    tied = estimate(Shape(3584, 18944, 28, 28, 4, 152064, True), EstimateArgs())
    assert tied["weights"] == pytest.approx(13.17, abs=0.01)  # one matrix, on the GPU
    assert base["graph_pool"] > 0 and "graph_pool" not in estimate(shape, EstimateArgs(
        max_length=8192))  # fmt: skip
    q = estimate(shape, EstimateArgs(quantization_bit=4))
    assert q["weights"] < base["weights"] / 2 and q["tokens_per_s"] < base["tokens_per_s"]
    long = estimate(shape, EstimateArgs(max_length=8192))
    assert long["checkpoints"] == pytest.approx(4 * base["checkpoints"], rel=1e-2)
    flat = estimate(shape, EstimateArgs(gradient_checkpointing=False))
    assert flat["peak_gib"] > base["peak_gib"] and flat["tokens_per_s"] > base["tokens_per_s"]


def test_cli_prints_an_estimate_and_refuses_a_missing_shape(capsys) -> None:
    flags = [f"--{k}={v}" for k, v in QWEN7B.items()]
    assert main(["estimate", *flags, "--max_length", "4096"]) == 0
    assert "peak" in capsys.readouterr().out
    assert main(["estimate", "--hidden_size", "64"]) == 2
    assert "--intermediate_size" in capsys.readouterr().err
