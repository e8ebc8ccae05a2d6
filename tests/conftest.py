"""Shared test setup: the tiny offline model as fixtures, an isolated cache, and the markers.

Tests get the tiny random Qwen2 through fixtures: ``tiny_tokenizer``, ``tiny_model``,
``make_tiny_model`` (another seed or dtype), ``tiny_model_dir`` (saved, for ``--model``) and
``checkpoint`` (a LoRA checkpoint trained by ``sft``). ``tiny.py`` builds them.

Markers: tests under tests/integration/ are ``integration``; tests that train a model
(``sft``, or the ``checkpoint`` fixture) are ``slow``: ``make test`` runs them,
``make test-unit`` skips them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Must be set before huggingface_hub is imported (it reads the variable at import time).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Converted models and other cached files go to a throwaway directory."""
    old = os.environ.get("TUNESMITH_CACHE")
    os.environ["TUNESMITH_CACHE"] = str(tmp_path_factory.mktemp("tunesmith-cache"))
    yield
    if old is None:
        os.environ.pop("TUNESMITH_CACHE", None)
    else:
        os.environ["TUNESMITH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny byte-level BPE tokenizer with the Qwen2.5 chat template."""
    from tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer):
    """``make_tiny_model(seed=0, dtype=torch.float32)``: a fresh tiny random Qwen2."""
    from tiny import build_tiny_model

    def make(seed: int = 0, dtype=None):
        import torch

        return build_tiny_model(tiny_tokenizer, seed=seed, dtype=dtype or torch.float32)

    return make


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    """The tiny random Qwen2 (seed 0, fp32), one per test module."""
    return make_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF model directory (tiny random Qwen2 + tokenizer), made once per session."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under tests/integration/ get the ``integration`` marker; tests that need the
    trained ``checkpoint`` fixture get ``slow``."""
    integration = TESTS / "integration"
    for item in items:
        if Path(str(item.path)).resolve().is_relative_to(integration):
            item.add_marker(pytest.mark.integration)
        if "checkpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def isolated_torch():
    """One intra-op thread (tiny matrices run several times faster so on a busy 2-core CPU),
    and Accelerate's process-wide state reset before and after the module."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    reset()
    yield
    reset()
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def checkpoint(isolated_torch, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A LoRA checkpoint of the tiny model, trained by ``sft`` (4 steps, fp32, with a system
    prompt in args.json); one per test module, which may write beside it."""
    import json

    from tunesmith.cli import parse_args
    from tunesmith.config import SftArgs
    from tunesmith.train.sft import sft

    work = tmp_path_factory.mktemp("ckpt")
    data = work / "d.jsonl"
    rows = [{"instruction": f"Echo {i}.", "output": f"{i}!"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["--model", str(tiny_model_dir), "--dataset", str(data), "--max_steps", "4",
            "--learning_rate", "5e-3", "--torch_dtype", "float32", "--report_to", "none",
            "--output_dir", str(work / "out"), "--system", "Be terse."]  # fmt: skip
    return sft(parse_args(SftArgs, "sft", "", argv)) / "checkpoint-4"


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    """``setup_logging`` binds its handler to the ``sys.stderr`` of its first call; clear it so
    each test's log lines reach capsys (not a closed stream of an earlier test), then restore."""
    import logging

    log = logging.getLogger("tunesmith")
    saved = log.handlers[:]
    log.handlers.clear()
    yield
    log.handlers[:] = saved
