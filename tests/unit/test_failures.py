"""Runs that go wrong: SIGTERM, SIGKILL at random moments, a failed save, a NaN loss."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import parse_args
from tunesmith.config import SftArgs
from tunesmith.model import lora
from tunesmith.train import checkpoint
from tunesmith.train.sft import sft
from tunesmith.utils import UserError

# Trains the tiny model: the slow group (make test runs it, make test-unit skips it).
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i} {i} {i}"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--torch_dtype", "float32", "--report_to", "none", "--logging_steps", "1",
            "--learning_rate", "1e-3", *extra]  # fmt: skip


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _check_every_listed_checkpoint(out: Path) -> list[Path]:
    """Every directory named checkpoint-N is complete and loads; returns them."""
    found = sorted(out.glob("v*/checkpoint-*"))
    for ckpt in found:
        json.loads((ckpt / "adapter_config.json").read_text())
        assert load_file(ckpt / "adapter_model.safetensors")
        assert load_file(ckpt / "training_state.safetensors")
        json.loads((ckpt / "training_state.json").read_text())
        json.loads((ckpt / "trainer_state.json").read_text())
    return found


def test_sigterm_saves_and_says_how_to_resume(tiny_model_dir: Path, data: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = _spawn(_argv(tiny_model_dir, data, out, "--max_steps", "100000", "--save_steps", "999"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("v*/logging.jsonl")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM received" in err and "--resume_from_checkpoint auto" in err
    assert "Traceback" not in err
    (ckpt,) = _check_every_listed_checkpoint(out)
    step = int(ckpt.name.split("-")[1])
    resumed = _spawn(
        _argv(tiny_model_dir, data, out, "--max_steps", str(step + 2),
              "--resume_from_checkpoint", "auto")
    )  # fmt: skip
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    # The resumed run continued in the same run directory, up to the new last step.
    assert [p.name for p in out.iterdir()] == [ckpt.parent.name]
    state = ckpt.parent / f"checkpoint-{step + 2}" / "trainer_state.json"
    assert json.loads(state.read_text(encoding="utf-8"))["global_step"] == step + 2


def test_sigkill_at_random_moments_never_leaves_a_broken_checkpoint(
    tiny_model_dir: Path, data: Path, tmp_path: Path
):
    out = tmp_path / "out"
    rng = random.Random(0)
    args = ["--max_steps", "400", "--save_steps", "1", "--save_total_limit", "3"]
    for _ in range(20):
        resume = ["--resume_from_checkpoint", "auto"] if _check_every_listed_checkpoint(out) else []
        proc = _spawn(_argv(tiny_model_dir, data, out, *args, *resume))
        time.sleep(rng.uniform(4.0, 12.0))  # start-up takes 4-8 s: some kills land before it
        proc.kill()
        proc.communicate(timeout=60)
        _check_every_listed_checkpoint(out)
    listed = _check_every_listed_checkpoint(out)
    assert listed, "no checkpoint was ever completed"
    last = max(int(p.name.split("-")[1]) for p in listed)
    final = _spawn(
        _argv(tiny_model_dir, data, out, *args, "--resume_from_checkpoint", "auto",
              "--max_steps", str(last + 2))
    )  # fmt: skip
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-2000:]
    assert any(p.name == f"checkpoint-{last + 2}" for p in out.glob("v*/checkpoint-*"))


def _args(model: Path, data: Path, out: Path, *extra: str) -> SftArgs:
    return parse_args(SftArgs, "tunesmith sft", "test", _argv(model, data, out, *extra)[1:])


def test_a_failed_save_is_clear_and_keeps_earlier_checkpoints(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = checkpoint.save_training_state

    def disk_full(path, optimizer, scheduler, position, *gathered):
        if position["global_step"] == 4:
            raise OSError(28, "No space left on device")
        real(path, optimizer, scheduler, position, *gathered)

    monkeypatch.setattr(checkpoint, "save_training_state", disk_full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"could not save .*checkpoint-4 \(No space left"):
        sft(_args(tiny_model_dir, data, out, "--max_steps", "6", "--save_steps", "2"))
    (run,) = out.glob("v*")
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    _check_every_listed_checkpoint(out)


def test_a_nan_loss_stops_with_a_clear_message(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = lora._ce
    calls = {"n": 0}

    def poisoned(head, h, t):
        calls["n"] += 1
        loss, correct = real(head, h, t)
        return (loss * float("nan") if calls["n"] > 3 else loss), correct

    monkeypatch.setattr(lora, "_ce", poisoned)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"loss became nan at step 4.*checkpoint-2"):
        # --fast without "loss": the poisoned _ce is the unfused loss path's.
        sft(_args(tiny_model_dir, data, out, "--max_steps", "6", "--save_steps", "2",
                  "--fast", "lora,kernels"))  # fmt: skip
    assert [p.name for p in _check_every_listed_checkpoint(out)] == ["checkpoint-2"]
    assert torch.isfinite(
        next(
            iter(
                load_file(
                    out.glob("v*/checkpoint-2").__next__() / "adapter_model.safetensors"
                ).values()
            )
        )
    ).all()


def test_a_kill_while_rotation_deletes_never_lists_a_half_deleted_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = tmp_path / "v0-run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")

    def killed_midway(path, ignore_errors=False):  # removes one file, then the process dies
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.rotate(run, limit=2)
    monkeypatch.undo()
    # checkpoint-1 vanished from the listing at once; the others are whole.
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    assert [p.name.split("-")[:3] for p in run.glob(".del-*")] == [[".del", "checkpoint", "1"]]
    checkpoint.rotate(run, limit=2)  # the next rotation clears what the kill left
    assert not list(run.glob(".del-*"))
