"""Run directories and checkpoints: versioned names, atomic writes, rotation.

A checkpoint appears under its final name only when complete (written to a temporary
sibling, fsynced, renamed), so a crash at any moment leaves every listed ``checkpoint-N``
loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.model.adapters import list_checkpoints
from tunesmith.utils import UserError, atomic_dir, fsync_dir, logger, write_json

RUN = re.compile(r"^v(\d+)-\d{8}-\d{6}$")


def new_run_dir(output_dir: Path, add_version: bool = True) -> Path:
    """``output_dir/vN-YYYYMMDD-HHMMSS`` with N one past the highest existing version."""
    output_dir = Path(output_dir)
    if not add_version:
        return output_dir
    versions = [int(m.group(1)) for p in output_dir.glob("v*") if (m := RUN.match(p.name))]
    n = max(versions, default=-1) + 1
    return output_dir / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    args: dict[str, Any],
    trainer_state: dict[str, Any],
    optimizer: Any = None,
    scheduler: Any = None,
) -> Path:
    """Write ``checkpoint-{step}``: the adapter (peft format), tokenizer, args and state.

    With ``optimizer`` and ``scheduler`` it also holds what an exact resume needs.
    """
    final = Path(run_dir) / f"checkpoint-{step}"
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "args.json", args)
            write_json(tmp / "trainer_state.json", trainer_state)
            if optimizer is not None and scheduler is not None:
                save_training_state(tmp, optimizer, scheduler, trainer_state)
    except OSError as e:
        # atomic_dir removed the partial copy; every earlier checkpoint is untouched.
        raise UserError(
            f"could not save {final} ({e.strerror or e}); earlier checkpoints are intact"
        ) from None
    logger.info(f"saved {final}")
    return final


def rotate(run_dir: Path, limit: int | None, keep: set[Path] = frozenset()) -> None:
    """Delete the oldest checkpoints beyond ``limit``; never the newest or those in ``keep``."""
    if not limit or limit <= 0:
        return
    for stale in Path(run_dir).glob(".del-checkpoint-*"):  # left by a kill mid-delete
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(run_dir)
    excess = len(ckpts) - limit
    for p in ckpts[:-1]:
        if excess <= 0:
            break
        if p in keep:
            continue
        remove_checkpoint(p)
        excess -= 1


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that it is never listed half-deleted.

    ``rmtree`` removes file after file: a kill in between would leave ``checkpoint-N``
    without its adapter config. Renaming it out of the listing first is atomic; what is
    left after a kill is a ``.del-`` folder that the next rotation clears.
    """
    trash = path.parent / f".del-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def save_training_state(
    path: Path, optimizer: Any, scheduler: Any, position: dict[str, Any]
) -> None:
    """Optimizer, scheduler, RNG and data position: what an exact resume needs.

    Tensors go to ``training_state.safetensors`` and the rest to ``training_state.json``; no
    pickle, so a checkpoint received from someone else cannot run code when loaded.
    """
    import numpy as np
    import torch
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, path / "training_state.safetensors")
    py_state = random.getstate()
    meta = {
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "position": position,
    }
    write_json(path / "training_state.json", meta)


def load_training_state(path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote; returns the saved data position."""
    from safetensors.torch import load_file

    meta = json.loads((path / "training_state.json").read_text(encoding="utf-8"))
    tensors = load_file(path / "training_state.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["optimizer_scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    restore_rng(path)
    return meta["position"]


def restore_rng(path: Path) -> None:
    """Set the Python, NumPy, torch (and CUDA) random states saved in a checkpoint."""
    import numpy as np
    import torch
    from safetensors import safe_open

    meta = json.loads((path / "training_state.json").read_text(encoding="utf-8"))
    # Read only the small RNG tensors, not the optimizer state stored beside them.
    with safe_open(path / "training_state.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("rng.")}  # noqa: SIM118
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["rng_numpy"]
    np.random.set_state(
        (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, internal, gauss_next = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss_next))


def find_resume_checkpoint(value: str, output_dir: Path) -> Path:
    """``--resume_from_checkpoint PATH|auto``: a complete checkpoint with training state."""
    if value == "auto":
        runs = sorted(
            (p for p in Path(output_dir).glob("v*") if RUN.match(p.name)),
            key=lambda p: int(RUN.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        for run in reversed(runs):
            ckpts = [c for c in list_checkpoints(run) if (c / "training_state.json").is_file()]
            if ckpts:
                return ckpts[-1]
        raise UserError(f"--resume_from_checkpoint auto: no checkpoint to resume in {output_dir}")
    path = Path(value).expanduser()
    if not any((path / n).is_file() for n in ("adapter_config.json", "config.json")):
        raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint directory")
    if not (path / "training_state.json").is_file():
        raise UserError(
            f"--resume_from_checkpoint {value}: the checkpoint holds no optimizer/RNG state "
            "(use --resume_only_model true to start a new run from its weights)"
        )
    return path
