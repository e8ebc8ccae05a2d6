"""``tunesmith data``: validate a dataset, show its statistics and what the model will learn."""

from __future__ import annotations

import statistics
from typing import Any

from tunesmith.data.collate import pack
from tunesmith.data.prepare import Prepared
from tunesmith.data.template import Sample
from tunesmith.options import TemplateOptions
from tunesmith.utils import IGNORE

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


def summarize(
    tokenizer: Any,
    data: Prepared,
    template: TemplateOptions,
    *,
    packing: bool,
    preview: int,
    color: bool,
) -> str:
    """The report ``tunesmith data`` prints: ``preview`` samples, ``color`` for a terminal."""
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
        f"p95 {percentile(lengths, 0.95)}, max {max(lengths)} (--max_length {template.max_length})"
    )
    lines += histogram(lengths)
    st = data.stats
    lines.append(
        f"too long for --max_length: {st.deleted} deleted, {st.truncated} truncated "
        f"({template.truncation}); {st.no_labels} dropped with nothing to learn"
    )
    if packing:
        packs = pack(train, template.max_length)
        fill = total / (len(packs) * template.max_length)
        lines.append(
            f"packing: {len(train)} samples -> {len(packs)} sequences of <= "
            f"{template.max_length} tokens ({fill:.0%} full)"
        )
    legend = "trained tokens in green" if color else "trained tokens [[in double brackets]]"
    for s in train[:preview]:
        lines.append(f"\n--- preview: {s.origin} ({legend}) ---")
        lines.append(render_sample(tokenizer, s, color))
    return "\n".join(lines)
