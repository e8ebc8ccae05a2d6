"""Run directories and checkpoints: versioned names, atomic writes, rotation.

A checkpoint appears under its final name only when complete (written to a temporary
sibling, fsynced, renamed), so a crash at any moment leaves every listed ``checkpoint-N``
loadable.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.utils import atomic_dir, logger, write_json

CKPT = re.compile(r"^checkpoint-(\d+)$")
RUN = re.compile(r"^v(\d+)-\d{8}-\d{6}$")


def new_run_dir(output_dir: Path, add_version: bool = True) -> Path:
    """``output_dir/vN-YYYYMMDD-HHMMSS`` with N one past the highest existing version."""
    output_dir = Path(output_dir)
    if not add_version:
        return output_dir
    versions = [int(m.group(1)) for p in output_dir.glob("v*") if (m := RUN.match(p.name))]
    n = max(versions, default=-1) + 1
    return output_dir / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    args: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoint-{step}``: the adapter (peft format), tokenizer, args and state."""
    final = Path(run_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "args.json", args)
        write_json(tmp / "trainer_state.json", trainer_state)
    logger.info(f"saved {final}")
    return final


def rotate(run_dir: Path, limit: int | None, keep: set[Path] = frozenset()) -> None:
    """Delete the oldest checkpoints beyond ``limit``; never the newest or those in ``keep``."""
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    excess = len(ckpts) - limit
    for p in ckpts[:-1]:
        if excess <= 0:
            break
        if p in keep:
            continue
        shutil.rmtree(p)
        excess -= 1
