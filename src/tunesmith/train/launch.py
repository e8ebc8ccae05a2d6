"""Several processes, ms-swift's way: ``NPROC_PER_NODE=2 tunesmith sft …`` re-launches itself.

The launcher is PyTorch's own (``torch.distributed.run``, i.e. torchrun), run in this process:
it starts ``NPROC_PER_NODE`` workers, each ``python -m tunesmith sft …`` with the same flags,
and Accelerate inside every worker reads the rank and world size torchrun set. Multi-node runs
take ms-swift's variables too: ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
``torchrun … -m tunesmith sft …`` and ``accelerate launch -m tunesmith sft …`` start the same
workers by hand; nothing here runs then.

When one worker fails, torchrun stops the others; the launcher then prints one sentence naming
the rank that failed first and why (each worker leaves its error in torchrun's error file, see
``record_worker_error``). Checkpoints are written whole or not at all, so the last one listed
is complete whichever process died when.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

from tunesmith.utils import Interrupted, UserError, error_line, logger

# Set in the workers by this launcher: they leave the one error message to it.
LAUNCHED = "TUNESMITH_LAUNCHED"


@dataclass(frozen=True)
class LaunchPlan:
    """Where this process sits in a multi-process run, read from ms-swift's variables."""

    nproc_per_node: int
    """Worker processes on this machine (``NPROC_PER_NODE``), one per GPU."""
    nnodes: int = 1
    """Machines taking part (``NNODES``)."""
    node_rank: int = 0
    """This machine's index, 0 … NNODES-1 (``NODE_RANK``); node 0 hosts the rendezvous."""
    master_addr: str = "127.0.0.1"
    """Address of node 0 (``MASTER_ADDR``), reachable from every node."""
    master_port: int | None = None
    """Port of the rendezvous on node 0 (``MASTER_PORT``); one node: a free port by default."""

    @property
    def world_size(self) -> int:
        """All worker processes of the run."""
        return self.nproc_per_node * self.nnodes


def in_worker() -> bool:
    """True inside a process started by torchrun / ``accelerate launch`` (it must not relaunch)."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def plan_from_env(env: dict[str, str] | None = None) -> LaunchPlan | None:
    """The launch asked for by ``NPROC_PER_NODE``/``NNODES``…, or None for one plain process."""
    env = dict(os.environ if env is None else env)
    if "NPROC_PER_NODE" not in env and "NNODES" not in env:
        return None

    def number(name: str, default: int, low: int) -> int:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"{name}={raw}: expected a whole number") from None
        if value < low:
            raise UserError(f"{name}={raw}: must be at least {low}")
        return value

    nproc = number("NPROC_PER_NODE", 1, 1)
    nnodes = number("NNODES", 1, 1)
    node_rank = number("NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    port = number("MASTER_PORT", 0, 1) or None
    addr = env.get("MASTER_ADDR", "").strip()
    if nnodes > 1 and (not addr or port is None):
        raise UserError(
            f"NNODES={nnodes}: set MASTER_ADDR (node 0's address, reachable from every node) and "
            "MASTER_PORT (a free port on node 0) on every node"
        )
    return LaunchPlan(nproc, nnodes, node_rank, addr or "127.0.0.1", port)


def torchrun_argv(plan: LaunchPlan, argv: list[str]) -> list[str]:
    """torchrun's arguments that start the workers of ``plan``, each ``-m tunesmith ARGV``."""
    out = [f"--nproc_per_node={plan.nproc_per_node}", f"--nnodes={plan.nnodes}"]
    if plan.nnodes > 1 or plan.master_port is not None:
        out += [f"--node_rank={plan.node_rank}", f"--master_addr={plan.master_addr}"]
        out += [f"--master_port={plan.master_port}"]
    # else torchrun picks a free local port itself, so two runs on one machine never collide.
    return [*out, "--max_restarts=0", "-m", "tunesmith", *argv]


def relaunch(plan: LaunchPlan, argv: list[str]) -> int:
    """Run ``tunesmith ARGV`` as the workers of ``plan`` and wait for them; the exit status.

    A worker failure becomes one ``UserError`` sentence (rank, reason, what is safe); a stop
    signal to this process reaches every worker, which saves and stops (exit status 130).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    where = f" (node {plan.node_rank} of {plan.nnodes}, {plan.world_size} in all)"
    where = where if plan.nnodes > 1 else ""
    logger.info(f"launching {plan.nproc_per_node} processes on this node{where}")
    os.environ[LAUNCHED] = "1"
    try:
        run(get_args_parser().parse_args(torchrun_argv(plan, argv)))
    except ChildFailedError as e:
        raise UserError(failure_sentence(e, plan)) from None
    except SignalException as e:
        raise Interrupted(
            f"{e.sigval.name} received: every process was asked to finish its step and save; "
            "continue with the same command plus --resume_from_checkpoint auto"
        ) from None
    finally:
        os.environ.pop(LAUNCHED, None)
    return 0


def failure_sentence(e: object, plan: LaunchPlan) -> str:
    """One sentence for a ``ChildFailedError``: the rank that failed first, and why."""
    failures = e.failures  # type: ignore[attr-defined]

    def when(rank: int) -> float:
        data = failures[rank].error_file_data or {}
        return float(data.get("time", failures[rank].timestamp))

    # A process killed by a signal (other than the SIGTERM torchrun sends the survivors) is the
    # root cause: it left no error file, so its time is torchrun's whole second, which can read
    # earlier or later than the float time of a peer that lost its connection to it.
    killed = [r for r, f in failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    # Otherwise our workers record a float time: the root cause, not a peer that lost its
    # connection to it a few milliseconds later in the same second.
    rank = min(killed) if killed else min(failures, key=when)
    failure = failures[rank]
    reason = failure.message if isinstance(failure.message, str) else ""
    if not reason:
        reason = (
            f"killed by {failure.signal_name()}"
            if failure.exitcode < 0
            else f"exit status {failure.exitcode}"
        )
    return (
        f"process {rank} of {plan.world_size} failed: {reason}; every process of the run was "
        "stopped, and the checkpoints already listed are complete (continue with "
        "--resume_from_checkpoint auto)"
    )


def record_worker_error(e: BaseException) -> bool:
    """Leave ``e`` in torchrun's error file for the launcher; True when the launcher will print.

    Under ``tunesmith``'s own launcher the worker stays quiet and the launcher prints one
    sentence; under a hand-started torchrun or ``accelerate launch`` each worker prints its own.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {error_line(e)}"
    data = {"message": message, "timestamp": int(time.time()), "time": time.time()}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        return False
    return os.environ.get(LAUNCHED) == "1"


def rank_prefix() -> str:
    """``[rank N] `` in a worker of a multi-process run, else empty: whose message this is."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
