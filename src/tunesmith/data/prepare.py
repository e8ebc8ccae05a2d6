"""From the data flags to tokenized train/validation samples, with a report of what was used."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.messages import Conversation
from tunesmith.data.sources import Loaded, load_spec, mix, report_problems, split_val
from tunesmith.data.template import EncodeStats, Sample
from tunesmith.data.tokenize import tokenize_dataset
from tunesmith.options import DataOptions, TemplateOptions
from tunesmith.utils import UserError, logger

# (train conversations, validation conversations, notes about skipped records)
Conversations = tuple[list[Conversation], list[Conversation], list[str]]


@dataclass
class Prepared:
    """Tokenized data ready for training, with the counts the log and ``tunesmith data`` show."""

    train: list[Sample]
    """Training samples."""
    val: list[Sample]
    """Validation samples (from --val_dataset or --split_dataset_ratio)."""
    stats: EncodeStats
    """Tokenization counts of the training data (deleted, truncated, …)."""
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    """--dataset value -> records and tokens it contributed to the training set."""
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks (skipped bad records, …)."""


def load_conversations(opts: DataOptions) -> Conversations:
    """Train and validation conversations; every bad record of every source reported at once."""
    if not opts.dataset:
        raise UserError("no training data: pass --dataset FILE (or 'self-cognition')")
    loaded = Loaded()
    for spec in opts.dataset:
        loaded.parts.append((spec, load_spec(spec, opts, loaded)))
    val_loaded = Loaded()
    val = [c for spec in opts.val_dataset for c in load_spec(spec, opts, val_loaded)]
    # Training and validation problems together: one error lists everything to fix.
    note = report_problems(loaded.problems + val_loaded.problems, opts.strict)
    notes = [note] if note else []
    train = mix([p for _, p in loaded.parts], opts.probs, opts.seed)
    if opts.split_ratio and not opts.val_dataset:
        train, val = split_val(train, opts.split_ratio, opts.seed)
    if not train:
        raise UserError(f"no training records left in {' '.join(opts.dataset)}")
    return train, val, notes


def prepare(
    data: DataOptions,
    template: TemplateOptions,
    tokenizer: Any,
    progress: bool = True,
    loaded: Conversations | None = None,
) -> Prepared:
    """Load, check, mix, split and tokenize ``data`` (or tokenize ``loaded``)."""
    train_convs, val_convs, notes = loaded or load_conversations(data)

    def tokenize(convs: list[Conversation]) -> tuple[list[Sample], EncodeStats]:
        return tokenize_dataset(
            tokenizer,
            convs,
            system=template.system,
            max_length=template.max_length,
            truncation=template.truncation,
            loss_scale=template.loss_scale,
            num_proc=data.num_proc,
            progress=progress,
        )

    train, stats = tokenize(train_convs)
    val = tokenize(val_convs)[0] if val_convs else []
    if not train:
        raise UserError(
            f"no sample left after tokenizing: {stats.deleted} longer than --max_length "
            f"{template.max_length} (--truncation_strategy delete), {stats.no_labels} with no "
            "assistant reply left to learn"
        )
    by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"records": 0, "tokens": 0})
    for s in train:
        entry = by_source[s.tags.get("source", "?")]
        entry["records"] += 1
        entry["tokens"] += len(s.input_ids)
    for note in notes:
        logger.info(note)
    for spec, entry in by_source.items():
        logger.info(f"dataset {spec}: {entry['records']} records, {entry['tokens']} tokens")
    if stats.deleted or stats.truncated:
        logger.info(
            f"--max_length {template.max_length}: {stats.deleted} samples deleted, "
            f"{stats.truncated} truncated ({template.truncation})"
        )
    return Prepared(train, val, stats, dict(by_source), notes)
