"""Launch plans and strategies, without starting processes: env vars, flags, one-line errors."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from tunesmith.cli import main
from tunesmith.train import launch
from tunesmith.train.distributed import micro_batches_to_skip
from tunesmith.train.strategy import DEEPSPEED_INSTALL, deepspeed_config, parse_strategy
from tunesmith.utils import UserError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_no_launch_without_ms_swift_variables() -> None:
    assert launch.plan_from_env({}) is None
    assert launch.plan_from_env({"CUDA_VISIBLE_DEVICES": "0,1"}) is None


def test_one_node_lets_torchrun_pick_a_free_port() -> None:
    plan = launch.plan_from_env({"NPROC_PER_NODE": "4"})
    assert plan == launch.LaunchPlan(4) and plan.world_size == 4
    argv = launch.torchrun_argv(plan, ["sft", "--model", "demo"])
    assert argv[:2] == ["--nproc_per_node=4", "--nnodes=1"]
    assert not [a for a in argv if a.startswith("--master")]
    assert argv[-5:] == ["-m", "tunesmith", "sft", "--model", "demo"]


def test_two_nodes_use_the_master_address_and_port() -> None:
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip
    plan = launch.plan_from_env(env)
    assert plan.world_size == 16
    argv = launch.torchrun_argv(plan, ["sft"])
    for flag in ("--nnodes=2", "--node_rank=1", "--master_addr=127.0.0.1", "--master_port=29500"):
        assert flag in argv


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two: expected a whole number"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0: must be at least 1"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "below NNODES"),
        ({"NNODES": "2", "NODE_RANK": "0"}, "set MASTER_ADDR"),
    ],
)
def test_bad_launch_variables_are_one_sentence(env, message) -> None:
    with pytest.raises(UserError, match=message):
        launch.plan_from_env(env)


def test_workers_never_relaunch(monkeypatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not launch.in_worker()
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun and `accelerate launch` set it
    assert launch.in_worker()


def test_failure_sentence_names_the_rank_that_failed_first() -> None:
    def failure(ts: float, msg: str, exitcode: int = 1, precise: float | None = None):
        data = {"time": precise} if precise is not None else {}
        return SimpleNamespace(timestamp=int(ts), message=msg, exitcode=exitcode,
                               error_file_data=data, signal_name=lambda: "SIGKILL")  # fmt: skip

    # Rank 0 lost its connection 30 ms after rank 1 ran out of memory, in the same second.
    err = SimpleNamespace(failures={
        0: failure(100.9, "RuntimeError: Connection reset by peer", precise=100.93),
        1: failure(100.9, "OutOfMemoryError: CUDA out of memory", precise=100.90),
    })  # fmt: skip
    text = launch.failure_sentence(err, launch.LaunchPlan(2))
    assert text.startswith("process 1 of 2 failed: OutOfMemoryError: CUDA out of memory;")
    assert "--resume_from_checkpoint auto" in text
    killed = SimpleNamespace(failures={1: failure(5, "", exitcode=-9)})
    assert "killed by SIGKILL" in launch.failure_sentence(killed, launch.LaunchPlan(2))
    # The race seen: the SIGKILLed rank has only the whole second torchrun noticed it (6), its peer
    # the precise, earlier time of its connection error (5.2); the killed one is the cause.
    race = SimpleNamespace(failures={
        0: failure(5.9, "RuntimeError: Connection reset by peer", precise=5.2),
        1: failure(6.0, "", exitcode=-9),
    })  # fmt: skip
    assert launch.failure_sentence(race, launch.LaunchPlan(2)).startswith(
        "process 1 of 2 failed: killed by SIGKILL;"
    )


def test_worker_errors_go_to_torchruns_error_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setenv(launch.LAUNCHED, "1")
    assert launch.record_worker_error(UserError("data.jsonl:3: output: missing"))
    data = json.loads(path.read_text())
    assert data["message"] == "data.jsonl:3: output: missing" and data["time"] > 0
    monkeypatch.delenv(launch.LAUNCHED)  # a hand-started torchrun: the worker prints itself
    assert not launch.record_worker_error(ValueError("x"))
    assert json.loads(path.read_text())["message"] == "ValueError: x"


def test_strategies() -> None:
    assert parse_strategy(None, None).kind == "ddp"
    fsdp = parse_strategy("full_shard auto_wrap", None)
    assert (fsdp.kind, fsdp.reshard_after_forward, fsdp.cpu_offload, fsdp.sharded) == (
        "fsdp", True, False, True,
    )  # fmt: skip
    grad_op = parse_strategy("shard_grad_op offload", None)
    assert not grad_op.reshard_after_forward and grad_op.cpu_offload
    assert parse_strategy("true", None).kind == "fsdp"


@pytest.mark.parametrize(
    ("fsdp", "deepspeed", "bits", "message"),
    [
        ("full_shard", "zero2", 0, "give one of them"),
        ("hybrid_shard", None, 0, "--fsdp 'hybrid_shard': expected some of"),
        ("full_shard shard_grad_op", None, 0, "exclude each other"),
        ("full_shard", None, 4, "--quantization_bit 4 cannot be combined with --fsdp"),
        (None, "zero3", 4, "--quantization_bit 4 cannot be combined with --deepspeed"),
    ],
)
def test_strategy_mistakes_are_one_sentence(fsdp, deepspeed, bits, message) -> None:
    with pytest.raises(UserError, match=message):
        parse_strategy(fsdp, deepspeed, bits)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="DeepSpeed is installed here")
def test_deepspeed_missing_says_how_to_install(capsys, tmp_path) -> None:
    with pytest.raises(UserError, match=r"needs DeepSpeed, which is not installed"):
        parse_strategy(None, "zero3")
    # From the command line: exit status 2, one line, nothing written.
    out = tmp_path / "out"
    assert main(["sft", "--deepspeed", "zero2", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --deepspeed zero2 needs DeepSpeed, which is not installed: "
                   f"{DEEPSPEED_INSTALL}"]  # fmt: skip
    assert not out.exists()


def test_deepspeed_presets_and_files(tmp_path) -> None:
    assert deepspeed_config("zero2")["zero_optimization"]["stage"] == 2
    z3 = deepspeed_config("zero3_offload")["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_param"]["device"] == "cpu"
    assert z3["stage3_gather_16bit_weights_on_model_save"]  # checkpoints are whole files
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(str(path))["zero_optimization"]["stage"] == 1
    path.write_text("{")
    with pytest.raises(UserError, match="not a valid JSON file"):
        deepspeed_config(str(path))
    with pytest.raises(UserError, match="no such file"):
        deepspeed_config(str(tmp_path / "nope.json"))
    path.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(UserError, match="stage must be 0, 1, 2 or 3"):
        deepspeed_config(str(path))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs DeepSpeed: pip install 'tunesmith[deepspeed]'")
def test_deepspeed_strategies() -> None:
    assert parse_strategy(None, "zero3").sharded and not parse_strategy(None, "zero2").sharded


def test_data_position_carries_over_a_change_of_process_count() -> None:
    # 2 processes consumed 3 micro-batches each: the epoch's first 6 batches.
    assert micro_batches_to_skip({"micro": 3, "world_size": 2}, 2) == 3
    assert micro_batches_to_skip({"micro": 3, "world_size": 2}, 1) == 6
    assert micro_batches_to_skip({"micro": 3}, 1) == 3  # a checkpoint of one process


def test_deepspeed_runs_cannot_resume_exactly() -> None:
    from tunesmith.train.strategy import Strategy, check_resume

    ds = Strategy(kind="deepspeed", deepspeed_config={"zero_optimization": {"stage": 2}})
    assert not ds.saves_optimizer and Strategy().saves_optimizer
    with pytest.raises(UserError, match="--resume_only_model true"):
        check_resume(ds, "auto", only_model=False)
    check_resume(ds, "auto", only_model=True)
    check_resume(Strategy(kind="fsdp"), "auto", only_model=False)
