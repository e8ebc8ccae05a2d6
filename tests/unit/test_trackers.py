"""--report_to: unknown or missing trackers are refused before a run starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.train.track import check_trackers
from tunesmith.utils import UserError


def test_known_installed_trackers_pass_and_none_is_dropped() -> None:
    assert check_trackers(["tensorboard"]) == ["tensorboard"]
    assert check_trackers(["none"]) == []
    assert check_trackers(["all"]) == ["all"]


def test_unknown_tracker_lists_the_choices() -> None:
    with pytest.raises(UserError, match=r"--report_to tensorbord: unknown tracker.*wandb"):
        check_trackers(["tensorbord"])


def test_missing_tracker_package_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(UserError, match=r"wandb is not installed; pip install wandb"):
        check_trackers(["wandb"])


def test_cli_refuses_before_writing_anything(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    out = tmp_path / "output"
    argv = ["sft", "--model", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out)]
    assert main([*argv, "--report_to", "bogus"]) == 2
    assert "unknown tracker" in capsys.readouterr().err
    assert not out.exists()
