"""Several processes on one CPU (gloo): DDP, FSDP2, two simulated nodes, a crashed rank.

Each run is ``NPROC_PER_NODE=2 python -m tunesmith sft …`` (or two launchers with NNODES=2),
so the launcher, the workers and the loop are the real ones. The reference is one process
with the same global batch: 2 processes x batch 2 take the same samples per step as one
process x batch 2 x 2 accumulation steps (Accelerate deals batch i to process i mod 2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.cli import parse_args
from tunesmith.config import SftArgs
from tunesmith.train.sft import sft

SRC = Path(__file__).resolve().parents[2] / "src"
pytestmark = [pytest.mark.usefixtures("isolated_torch"), pytest.mark.slow]


def _fsdp2_on_cpu() -> str | None:
    """Why FSDP2 cannot run here, or None when it can."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed with gloo"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 records: 8 batches of 2, 4 per process and epoch."""
    path = tmp_path_factory.mktemp("mp-data") / "d.jsonl"
    rows = [
        {"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 2)))}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
            "--torch_dtype", "float32", "--report_to", "none", *extra]  # fmt: skip


def _env(**launch: str) -> dict[str, str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": path, **launch}


def _spawn(flags: list[str], **launch: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "sft", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**launch),
    )  # fmt: skip


def _launch(flags: list[str], **launch: str) -> str:
    """Run to the end; its stderr (the log)."""
    proc = _spawn(flags, **launch)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def _one(model: Path, data: Path, out: Path, *extra: str) -> Path:
    """The single-process reference, in this process."""
    return sft(parse_args(SftArgs, "tunesmith sft", "", _flags(model, data, out, *extra)))


def _run(out: Path) -> Path:
    (run,) = sorted(out.glob("v*"))
    return run


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "logging.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def _cut_at(run: Path, step: int, dest: Path) -> Path:
    """A copy of ``run`` as if killed right after ``checkpoint-step``."""
    cut = dest / run.name
    cut.mkdir(parents=True)
    shutil.copytree(run / f"checkpoint-{step}", cut / f"checkpoint-{step}")
    shutil.copy(run / "args.json", cut / "args.json")
    return cut


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, data, tmp_path_factory) -> tuple[Path, str]:
    """LoRA on 2 processes (DDP), no dropout, with TensorBoard: (run dir, log)."""
    out = tmp_path_factory.mktemp("mp-ddp")
    flags = _flags(tiny_model_dir, data, out, "--lora_dropout", "0", "--report_to", "tensorboard")
    err = _launch(flags, NPROC_PER_NODE="2")
    return _run(out), err


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The same run in one process: batch 2 x 2 accumulation steps."""
    out = tmp_path_factory.mktemp("mp-one")
    return _one(tiny_model_dir, data, out, "--lora_dropout", "0", "--gradient_accumulation_steps",
                "2")  # fmt: skip


def test_two_processes_train_like_one_with_the_same_global_batch(ddp, single) -> None:
    run, err = ddp
    assert "2 processes (DDP, one replica each, gloo)" in err
    two, one = _losses(run), _losses(single)
    assert list(two) == [1, 2, 3, 4]
    assert two == pytest.approx(one, rel=1e-5)
    assert two[4] < two[1]  # it learns
    for step in (2, 4):
        name = f"checkpoint-{step}/adapter_model.safetensors"
        _assert_close(load_file(run / name), load_file(single / name))


def test_only_rank_zero_writes(ddp) -> None:
    run, err = ddp
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # one run dir, one name
    events = list(run.rglob("events.out.tfevents.*"))  # …tfevents.TIME.HOST.PID.N
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # one writer
    records = (run / "logging.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2, 3, 4]  # no line twice
    assert err.count(f"saved {run / 'checkpoint-2'}") == 1  # one process logs
    assert err.count("training: 4 steps") == 1
    assert not [p for p in run.rglob("*") if p.name.startswith((".tmp-", ".del-"))]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    meta = json.loads((run / "checkpoint-4" / "training_state.json").read_text())
    assert len(meta["rng_ranks"]) == 2  # every rank's random state, gathered on rank 0


def test_a_two_process_checkpoint_resumes_in_one_process(
    ddp, tiny_model_dir, data, tmp_path
) -> None:
    run, _ = ddp
    cut = _cut_at(run, 2, tmp_path / "resume")
    resumed = _one(tiny_model_dir, data, tmp_path / "resume", "--lora_dropout", "0",
                   "--gradient_accumulation_steps", "2",
                   "--resume_from_checkpoint", "auto")  # fmt: skip
    assert resumed == cut
    assert _losses(resumed) == pytest.approx({k: v for k, v in _losses(run).items() if k > 2})
    name = "checkpoint-4/adapter_model.safetensors"
    _assert_close(load_file(resumed / name), load_file(run / name))


def test_fsdp2_full_fine_tuning_equals_one_process_and_resumes_in_one(
    tiny_model_dir, data, tmp_path
) -> None:
    why = _fsdp2_on_cpu()
    if why:
        pytest.skip(f"FSDP2 on CPU: {why}")
    full = ("--train_type", "full", "--lora_dropout", "0")
    err = _launch(_flags(tiny_model_dir, data, tmp_path / "fsdp", *full, "--fsdp", "full_shard"),
                  NPROC_PER_NODE="2")  # fmt: skip
    assert "2 processes (FSDP2, weights sharded, gloo)" in err
    run = _run(tmp_path / "fsdp")
    single = _one(tiny_model_dir, data, tmp_path / "one", *full, "--gradient_accumulation_steps",
                  "2")  # fmt: skip
    assert _losses(run) == pytest.approx(_losses(single), rel=1e-5)
    # The gathered checkpoint is an ordinary transformers directory, like one process's.
    for step in (2, 4):
        name = f"checkpoint-{step}/model.safetensors"
        _assert_close(load_file(run / name), load_file(single / name))
    # The gathered optimizer state resumes the run in one process.
    cut = _cut_at(run, 2, tmp_path / "resume")
    resumed = _one(tiny_model_dir, data, tmp_path / "resume", *full,
                   "--gradient_accumulation_steps", "2",
                   "--resume_from_checkpoint", "auto")  # fmt: skip
    assert resumed == cut
    assert _losses(resumed) == pytest.approx({k: v for k, v in _losses(run).items() if k > 2})


def _nodes(flags: list[str]) -> str:
    """Two launchers of one process each, as node 0 and node 1 of one run on loopback."""
    port = str(_free_port())
    procs = [
        _spawn(flags, NPROC_PER_NODE="1", NNODES="2", NODE_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for rank in (0, 1)
    ]  # fmt: skip
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return errs[0]


def test_two_nodes_and_an_exact_resume_on_two_processes(tiny_model_dir, data, tmp_path) -> None:
    # Dropout on: each rank's random state must come back for the resume to be exact.
    extra = ("--lora_dropout", "0.1")
    err = _nodes(_flags(tiny_model_dir, data, tmp_path / "nodes", *extra))
    assert "node 0 of 2, 2 in all" in err and "2 processes (DDP" in err
    run = _run(tmp_path / "nodes")
    cut = _cut_at(run, 2, tmp_path / "resume")
    _launch(
        _flags(tiny_model_dir, data, tmp_path / "resume", *extra, "--resume_from_checkpoint",
               "auto"),
        NPROC_PER_NODE="2",
    )  # fmt: skip
    assert _losses(cut) == {k: v for k, v in _losses(run).items() if k > 2}  # exactly
    name = "checkpoint-4/adapter_model.safetensors"
    a, b = load_file(cut / name), load_file(run / name)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the worker of ``rank`` whose command line holds ``marker`` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_a_crashed_rank_stops_the_run_with_one_message(tiny_model_dir, data, tmp_path) -> None:
    out = tmp_path / "crash"
    flags = _flags(tiny_model_dir, data, out, "--max_steps", "100000", "--lora_dropout", "0")
    proc = _spawn(flags, NPROC_PER_NODE="2")
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("v*/checkpoint-2")):
        time.sleep(0.2)
    pid = _worker_pid(str(out), 1)
    assert pid is not None, "no worker of rank 1 found"
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: process 1 of 2 failed: ") and "SIGKILL" in lines[0]
    assert "--resume_from_checkpoint auto" in lines[0]
    # Every checkpoint listed is whole and resumable.
    ckpts = sorted(out.glob("v*/checkpoint-*"))
    assert ckpts
    for ckpt in ckpts:
        assert load_file(ckpt / "adapter_model.safetensors")
        assert load_file(ckpt / "training_state.safetensors")
        json.loads((ckpt / "training_state.json").read_text())
