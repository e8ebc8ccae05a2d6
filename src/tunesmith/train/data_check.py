"""``tunesmith data``: check a dataset with the model's tokenizer, before training on it."""

from __future__ import annotations

import sys
from typing import Any

from tunesmith.config import DataCommandArgs
from tunesmith.data.prepare import Prepared, prepare
from tunesmith.data.report import summarize
from tunesmith.model.load import load_tokenizer, resolve_model
from tunesmith.options import data_options, template_options


def check_data(args: DataCommandArgs, progress: bool = True) -> tuple[Any, Prepared]:
    """(tokenizer, prepared data): ``--dataset`` validated and tokenized with ``--model``'s
    tokenizer (default: the demo model's, as ``sft``); ``progress``: the tokenizing bar."""
    tokenizer = load_tokenizer(resolve_model(args.model or "demo", args.use_hf))
    return tokenizer, prepare(data_options(args, use_hf=args.use_hf), template_options(args),
                              tokenizer, progress=progress)  # fmt: skip


def data_command(args: DataCommandArgs, checked: tuple[Any, Prepared] | None = None) -> str:
    """The report ``tunesmith data`` prints (``checked``: ``check_data(args)`` if done)."""
    tokenizer, data = checked or check_data(args)
    template = template_options(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    return summarize(tokenizer, data, template, packing=args.packing, preview=args.preview,
                     color=color)  # fmt: skip
