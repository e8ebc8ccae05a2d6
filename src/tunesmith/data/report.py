"""``tunesmith data``: validate a dataset, show its statistics and what the model will learn."""

from __future__ import annotations

import statistics
import sys
from typing import Any

from tunesmith.data.collate import pack
from tunesmith.data.prepare import Prepared, prepare
from tunesmith.data.template import IGNORE, Sample

BAR = 40


def percentile(values: list[int], q: float) -> int:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram(values: list[int], bins: int = 10) -> list[str]:
    """Text histogram lines ``lo-hi | ####### count``."""
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - lo) // width)] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        a = lo + i * width
        if a > hi:
            break
        bar = "#" * max(1 if c else 0, round(BAR * c / top))
        lines.append(f"  {a:>6}-{min(hi, a + width - 1):<6} | {bar} {c}")
    return lines


def render_sample(tokenizer: Any, sample: Sample, color: bool) -> str:
    """The sample's text with trained tokens highlighted (green) or ``[[bracketed]]``."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(sample.input_ids, sample.labels, strict=True):
        trained = lab != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    out = []
    for trained, ids in runs:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if color:
            out.append(f"\033[1;32m{text}\033[0m" if trained else f"\033[2m{text}\033[0m")
        else:
            out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


def summarize(args: Any, tokenizer: Any, data: Prepared) -> str:
    """The report ``tunesmith data`` prints."""
    train = data.train
    lengths = [len(s.input_ids) for s in train]
    total = sum(lengths)
    trained = sum(s.n_trained for s in train)
    lines = ["records per source:"]
    for spec, e in data.by_source.items():
        lines.append(f"  {spec}: {e['records']} records, {e['tokens']} tokens")
    lines += data.notes
    lines.append(
        f"samples: {len(train)} train, {len(data.val)} validation; {total} tokens, "
        f"{trained} ({trained / max(1, total):.1%}) carry loss"
    )
    lines.append(
        f"token length: min {min(lengths)}, median {int(statistics.median(lengths))}, "
        f"p95 {percentile(lengths, 0.95)}, max {max(lengths)} (--max_length {args.max_length})"
    )
    lines += histogram(lengths)
    st = data.stats
    lines.append(
        f"too long for --max_length: {st.deleted} deleted, {st.truncated} truncated "
        f"({args.truncation_strategy}); {st.no_labels} dropped with nothing to learn"
    )
    if args.packing:
        packs = pack(train, args.max_length)
        fill = total / (len(packs) * args.max_length)
        lines.append(
            f"packing: {len(train)} samples -> {len(packs)} sequences of <= {args.max_length} "
            f"tokens ({fill:.0%} full)"
        )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    legend = "trained tokens in green" if color else "trained tokens [[in double brackets]]"
    for s in train[: args.preview]:
        lines.append(f"\n--- preview: {s.origin} ({legend}) ---")
        lines.append(render_sample(tokenizer, s, color))
    return "\n".join(lines)


def data_command(args: Any) -> str:
    """Validate and tokenize ``args.dataset`` with ``args.model``'s tokenizer; the report."""
    from tunesmith.model.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model or "demo", args.use_hf))
    data = prepare(args, tokenizer)
    return summarize(args, tokenizer, data)
