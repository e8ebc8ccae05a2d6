"""Answers cached per model + item, so a rerun of ``tunesmith eval`` generates nothing and a
new item costs one answer.

A model is identified by a fingerprint of what decides its greedy answers: the base weights
(path, sizes and modification times of its files: hashing a gigabyte on every run would cost
more than it saves), the adapter weights (sha256, they are small), the dtype and device. An
item by its rendered conversation (system prompt included) and answer length. Answers are
appended to ``$TUNESMITH_CACHE/eval/MODEL.jsonl`` after every batch, so an interrupted eval
keeps what it already generated; a torn last line is ignored on reading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from tunesmith.utils import cache_dir, logger, write_json

CACHE_VERSION = 1  # bump when the generation settings change meaning


def _sha(*parts: Any) -> str:
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(model_dir: Path, dtype: str, device: str) -> str:
    """The base model's key: its folder, the size and mtime of each file, dtype and device."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return _sha(CACHE_VERSION, str(Path(model_dir).resolve()), stats, dtype, device)


def adapter_fingerprint(base: str, adapter: Path) -> str:
    """The tuned model's key: the base's key and the adapter's weights and config."""
    weights = next(
        (adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin")
         if (adapter / n).is_file()),
        None,
    )  # fmt: skip
    config = (adapter / "adapter_config.json").read_text(encoding="utf-8")
    return _sha(base, file_digest(weights) if weights else "", config)


def item_key(conversation: list[dict[str, str]], max_new_tokens: int) -> str:
    """The key of one question: its full conversation and the answer length (greedy)."""
    return _sha(conversation, max_new_tokens)


class AnswerCache:
    """The cached answers of one model (a JSON Lines file of ``{"key", "answer"}``)."""

    def __init__(self, model_key: str, enabled: bool = True) -> None:
        self.path = cache_dir() / "eval" / f"{model_key}.jsonl"
        self.speed_path = self.path.with_suffix(".speed.json")
        self.enabled = enabled
        self.answers: dict[str, str] = {}
        if enabled and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["key"]] = row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-write

    def get(self, key: str) -> str | None:
        """The cached answer, or None."""
        return self.answers.get(key)

    def put(self, pairs: list[tuple[str, str]]) -> None:
        """Remember answers and append them to the file (one flush per batch)."""
        self.answers.update(pairs)
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                for key, answer in pairs:
                    f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
        except OSError as e:  # a read-only cache costs speed on the next run, not this result
            logger.warning(f"cannot write the eval cache {self.path}: {e.strerror or e}")
            self.enabled = False

    def speed(self) -> dict[str, float] | None:
        """The cached latency figures of this model, if measured before."""
        if self.enabled and self.speed_path.is_file():
            try:
                return json.loads(self.speed_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return None
        return None

    def put_speed(self, figures: dict[str, float]) -> None:
        """Remember the latency figures."""
        if self.enabled:
            with contextlib.suppress(OSError):
                write_json(self.speed_path, figures)
