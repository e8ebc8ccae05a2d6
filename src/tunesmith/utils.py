"""Small helpers with no project imports: errors, logging, paths, seeding, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("tunesmith")

# The label of a token that carries no loss (PyTorch's cross-entropy ignore_index). Here, not
# in data/, because both the data side (labels) and the model side (the loss) need it.
IGNORE = -100


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing model).

    The CLI prints its message as one sentence and exits non-zero, without a traceback.
    """


class Interrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit status 130)."""


def setup_logging(level: int = logging.INFO) -> None:
    """Send tunesmith's log lines to stderr with a short timestamped format."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def error_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters ("" if none):
    enough to say why in a one-sentence error, without a library's multi-line dump."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else ""


def cache_dir() -> Path:
    """Where converted models and tokenized datasets live (``$TUNESMITH_CACHE`` overrides)."""
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tunesmith"
    )
    return Path(root)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so two runs with the same seed do the same thing."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to ``final`` only on success.

    A crash at any moment leaves either no ``final`` or a complete one, never a half-written
    directory under the final name. An existing ``final`` is replaced only after the new one
    is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path that replaces ``final`` only once fully written.

    The file is fsynced, renamed over ``final`` and the folder entry flushed; on any error the
    temporary file is removed. ``final`` is therefore absent, the previous file, or the new
    complete one, never a truncated one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (``atomic_file``), UTF-8, human-readable."""
    with atomic_file(path) as tmp:
        text = json.dumps(obj, ensure_ascii=False, indent=2, default=str)
        tmp.write_text(text + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line atomically (``atomic_file``), UTF-8."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def human_bytes(n: float) -> str:
    """Format a byte count as e.g. ``1.3 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# A faster malloc for CPU training: tcmalloc first (measured best on the peers' recipe, see
# bench/RESULTS.md), then jemalloc; Debian's packages libtcmalloc-minimal4 / libjemalloc2.
MALLOC_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
)


def malloc_env(env: dict[str, str]) -> dict[str, str] | None:
    """``env`` with ``LD_PRELOAD`` naming the first installed malloc of ``MALLOC_LIBS``, or
    None when there is none, one is preloaded already, or ``TUNESMITH_MALLOC=system``."""
    if env.get("TUNESMITH_MALLOC", "") == "system" or sys.platform != "linux":
        return None
    preload = env.get("LD_PRELOAD", "")
    if any(Path(lib).name in preload for lib in MALLOC_LIBS):
        return None
    lib = next((lib for lib in MALLOC_LIBS if Path(lib).exists()), None)
    if lib is None:
        return None
    return env | {"LD_PRELOAD": f"{lib}:{preload}" if preload else lib}


def reexec_with_malloc(argv: list[str]) -> None:
    """Start this command again with a faster malloc preloaded (``malloc_env``); returns
    only when there is nothing to change. For the process's own entry point only: it
    replaces the running process."""
    env = malloc_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunesmith", *argv], env)


def parse_parts(flag: str, spec: str, parts: tuple[str, ...], auto: tuple[str, ...]) -> set[str]:
    """The parts a ``--flag auto|all|none|a,b,…`` value switches on (``auto``: ``auto``'s);
    an unknown part is a ``UserError`` naming the flag and the parts there are."""
    spec = spec.strip().lower()
    if spec == "auto":
        return set(auto)
    if spec in ("all", "on", "true"):
        return set(parts)
    if spec in ("none", "off", "false", ""):
        return set()
    chosen = {p.strip() for p in spec.split(",") if p.strip()}
    unknown = sorted(chosen - set(parts))
    if unknown:
        raise UserError(
            f"{flag}: unknown part {unknown[0]!r}; use auto, all, none, or a comma list of "
            f"{', '.join(parts)}"
        )
    return chosen
