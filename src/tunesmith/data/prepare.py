"""From the data flags to tokenized train/validation samples, with a report of what was used."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.messages import Conversation
from tunesmith.data.sources import (
    DataOptions,
    Loaded,
    load_spec,
    mix,
    parse_columns,
    parse_probs,
    report_problems,
    split_val,
)
from tunesmith.data.template import EncodeStats, Sample
from tunesmith.data.tokenize import tokenize_dataset
from tunesmith.utils import UserError, logger


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


def options(args: Any) -> DataOptions:
    """DataOptions from parsed flags (sft or data command)."""
    return DataOptions(
        model_name=args.model_name,
        model_author=args.model_author,
        columns=parse_columns(args.columns),
        fmt=args.dataset_format,
        strict=args.strict,
        use_hf=args.use_hf,
        seed=args.seed,
    )


def load_conversations(
    args: Any,
) -> tuple[list[Conversation], list[Conversation], list[str]]:
    """Train and validation conversations; every bad record of every source reported at once."""
    if not args.dataset:
        raise UserError("no training data: pass --dataset FILE (or 'self-cognition')")
    opts = options(args)
    loaded = Loaded()
    for spec in args.dataset:
        loaded.parts.append((spec, load_spec(spec, opts, loaded)))
    val_loaded = Loaded()
    val = [c for spec in args.val_dataset for c in load_spec(spec, opts, val_loaded)]
    # Training and validation problems together: one error lists everything to fix.
    note = report_problems(loaded.problems + val_loaded.problems, opts.strict)
    notes = [note] if note else []
    train = mix([p for _, p in loaded.parts], parse_probs(args.dataset_probs), args.seed)
    if args.split_dataset_ratio and not args.val_dataset:
        train, val = split_val(train, args.split_dataset_ratio, args.seed)
    if not train:
        raise UserError(f"no training records left in {' '.join(args.dataset)}")
    return train, val, notes


def prepare(
    args: Any,
    tokenizer: Any,
    progress: bool = True,
    loaded: tuple[list[Conversation], list[Conversation], list[str]] | None = None,
) -> Prepared:
    """Load, check, mix, split and tokenize the data of ``args`` (or tokenize ``loaded``)."""
    train_convs, val_convs, notes = loaded or load_conversations(args)
    settings = {
        "system": args.system,
        "max_length": args.max_length,
        "truncation": args.truncation_strategy,
        "loss_scale": args.loss_scale,
        "num_proc": args.dataset_num_proc,
        "progress": progress,
    }
    train, stats = tokenize_dataset(tokenizer, train_convs, **settings)
    val, _ = tokenize_dataset(tokenizer, val_convs, **settings) if val_convs else ([], None)
    if not train:
        raise UserError(
            f"no sample left after tokenizing: {stats.deleted} longer than --max_length "
            f"{args.max_length} (--truncation_strategy delete), {stats.no_labels} with no "
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
            f"--max_length {args.max_length}: {stats.deleted} samples deleted, "
            f"{stats.truncated} truncated ({args.truncation_strategy})"
        )
    return Prepared(train, val, stats, dict(by_source), notes)
