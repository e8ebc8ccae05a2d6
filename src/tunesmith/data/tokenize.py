"""Tokenize a whole dataset: batched, optionally parallel, cached on disk.

The cache key covers the records' content, the tokenizer and its chat template, ``--system``,
``--max_length``, the truncation strategy and the loss scale, so a second run on the same data
starts at once and any change re-tokenizes. Cached arrays are plain ``.npy`` files and JSON
(no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.messages import Conversation
from tunesmith.data.template import EncodeStats, Sample, encode_batch
from tunesmith.utils import atomic_dir, cache_dir, logger

CHUNK = 512
CACHE_VERSION = "1"
_TOKENIZER: Any = None  # set before forking workers, so they inherit it instead of pickling


def cache_key(tokenizer: Any, convs: list[Conversation], settings: dict[str, Any]) -> str:
    """A digest of everything the tokenized result depends on."""
    h = hashlib.sha256()
    ident = {
        "v": CACHE_VERSION,
        "tok": getattr(tokenizer, "name_or_path", ""),
        "vocab": len(tokenizer),
        "template": tokenizer.chat_template,
        "eos": tokenizer.eos_token,
        **settings,
    }
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    for c in convs:
        h.update(json.dumps([c.origin, c.as_dicts(), c.tags], ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def _work(
    args: tuple[list[Conversation], dict[str, Any]],
) -> tuple[list[Sample | None], EncodeStats]:
    convs, settings = args
    return encode_batch(_TOKENIZER, convs, **settings)


def tokenize_dataset(
    tokenizer: Any,
    convs: list[Conversation],
    *,
    system: str | None,
    max_length: int,
    truncation: str,
    loss_scale: str,
    num_proc: int = 1,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[list[Sample], EncodeStats]:
    """Samples of ``convs`` (``--system`` applied where a record has none) and their counts."""
    global _TOKENIZER
    from tqdm.auto import tqdm

    convs = [c.with_system(system) for c in convs]
    settings = {"max_length": max_length, "truncation": truncation, "loss_scale": loss_scale}
    key = cache_key(tokenizer, convs, settings) if use_cache else ""
    path = cache_dir() / "tokenized" / key
    if use_cache and (path / "meta.json").is_file():
        try:
            samples, stats = _load(path)
            logger.info(f"tokenized data from cache ({len(samples)} samples): {path}")
            return samples, stats
        except (OSError, ValueError, KeyError):
            logger.info(f"ignoring an unreadable tokenization cache: {path}")
    chunks = [(convs[i : i + CHUNK], settings) for i in range(0, len(convs), CHUNK)]
    bar = tqdm(
        total=len(convs), desc="tokenizing", unit="rec", disable=not progress or len(convs) < 2000
    )
    stats = EncodeStats()
    samples: list[Sample] = []
    _TOKENIZER = tokenizer
    if num_proc > 1 and len(chunks) > 1:
        import multiprocessing

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            results = pool.imap(_work, chunks)
            samples = _collect(results, chunks, stats, bar)
    else:
        samples = _collect(map(_work, chunks), chunks, stats, bar)
    bar.close()
    if use_cache:
        try:
            _save(path, samples, stats)
        except OSError as e:  # a full or read-only cache never stops training
            logger.info(f"could not write the tokenization cache ({e})")
    return samples, stats


def _collect(results: Any, chunks: list, stats: EncodeStats, bar: Any) -> list[Sample]:
    out: list[Sample] = []
    for (convs, _), (part, part_stats) in zip(chunks, results, strict=True):
        out.extend(s for s in part if s is not None)
        for name in ("samples", "deleted", "truncated", "no_labels"):
            setattr(stats, name, getattr(stats, name) + getattr(part_stats, name))
        bar.update(len(convs))
    return out


def _save(path: Path, samples: list[Sample], stats: EncodeStats) -> None:
    with atomic_dir(path) as tmp:
        lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        np.save(tmp / "lengths.npy", lengths, allow_pickle=False)
        np.save(tmp / "input_ids.npy", np.array(ids, dtype=np.int64), allow_pickle=False)
        np.save(tmp / "labels.npy", np.array(labels, dtype=np.int64), allow_pickle=False)
        meta = {
            "origins": [s.origin for s in samples],
            "tags": [s.tags for s in samples],
            "stats": vars(stats),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def _load(path: Path) -> tuple[list[Sample], EncodeStats]:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    lengths = np.load(path / "lengths.npy", allow_pickle=False)
    ids = np.load(path / "input_ids.npy", allow_pickle=False).tolist()
    labels = np.load(path / "labels.npy", allow_pickle=False).tolist()
    samples = []
    pos = 0
    for n, origin, tags in zip(lengths.tolist(), meta["origins"], meta["tags"], strict=True):
        samples.append(Sample(ids[pos : pos + n], labels[pos : pos + n], origin, tags))
        pos += n
    return samples, EncodeStats(**meta["stats"])
