"""``tunesmith data``: check a dataset with the model's tokenizer, before training on it."""

from __future__ import annotations

import sys

from tunesmith.config import DataCommandArgs
from tunesmith.data.prepare import prepare
from tunesmith.data.report import summarize
from tunesmith.model.load import load_tokenizer, resolve_model
from tunesmith.options import data_options, template_options


def data_command(args: DataCommandArgs) -> str:
    """Validate and tokenize ``--dataset`` with ``--model``'s tokenizer (default: the demo
    model's, as ``sft``); the report to print."""
    tokenizer = load_tokenizer(resolve_model(args.model or "demo", args.use_hf))
    template = template_options(args)
    data = prepare(data_options(args, use_hf=args.use_hf), template, tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    return summarize(tokenizer, data, template, packing=args.packing, preview=args.preview,
                     color=color)  # fmt: skip
