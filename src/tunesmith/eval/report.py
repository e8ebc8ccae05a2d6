"""The eval's outputs: the summary table, ``report.md``, ``report.json``, ``answers.jsonl`` and
PNG charts, written into one folder that appears only when complete (``atomic_dir``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.eval.items import Item
from tunesmith.eval.score import Row
from tunesmith.utils import atomic_dir

HEADER = ("Model", "Dataset", "Metric", "Subset", "Num", "Score")
MAX_FAILURES_SHOWN = 30


def summary_table(rows: list[Row]) -> str:
    """ms-swift's summary table (Model | Dataset | Metric | Subset | Num | Score), scores 0–100,
    as a Markdown table that also reads well in a terminal."""
    cells = [HEADER] + [
        (r.model, r.dataset, r.metric, r.subset, str(r.num), f"{r.score:.1f}") for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _failures(labels: list[str], items: list[Item], answers: dict[str, list[str]],
              scores: dict[str, list[dict[str, Any]]]) -> list[str]:  # fmt: skip
    """Markdown lines listing the failed identity probes of the last (tuned) model."""
    label = labels[-1]
    bad = [i for i, it in enumerate(items)
           if it.kind == "identity" and not scores[label][i]["passed"]]  # fmt: skip
    if not bad:
        return [f"Every identity probe passed for {label}."]
    out = [f"Failed identity probes of {label} ({len(bad)}):", "",
           "| probe | answer | why |", "|---|---|---|"]  # fmt: skip
    for i in bad[:MAX_FAILURES_SHOWN]:
        q = items[i].messages[-1]["content"]
        out.append(f"| {_one_line(q, 60)} | {_one_line(answers[label][i])} | "
                   f"{scores[label][i]['reason']} |")  # fmt: skip
    if len(bad) > MAX_FAILURES_SHOWN:
        out.append(f"\n… and {len(bad) - MAX_FAILURES_SHOWN} more in answers.jsonl")
    return out


def markdown(meta: dict[str, Any], labels: list[str], items: list[Item],
             answers: dict[str, list[str]], scores: dict[str, list[dict[str, Any]]],
             rows: list[Row], speed: dict[str, dict[str, float]],
             drift: dict[str, float] | None, charts: list[str]) -> str:  # fmt: skip
    """The human-readable report."""
    lines = ["# tunesmith eval", "",
             f"- base model: `{meta['base_model']}`",
             f"- adapter: `{meta['adapters']}`" if meta["adapters"] else "- adapter: none",
             f"- system prompt: {meta['system']!r}",
             f"- identity: {', '.join(meta['identity']) or '(none)'}; base identity: "
             f"{', '.join(meta['base_identity'])}",
             f"- greedy answers by {meta.get('backend', 'pt')} on {meta['device']} "
             f"({meta['dtype']}); eval wall time "
             f"{meta['wall_s']} s, load average {meta['load_avg_1m']}, {meta['date']}"
             + ("" if meta.get("generated", True) else " (every answer from the cache)"),
             "", "## Summary (scores 0–100)", "", summary_table(rows), ""]  # fmt: skip
    if drift is not None:
        lines += ["## How far tuning moved the answers", "",
                  f"Retention answers that changed: {drift['changed_pct']:.1f}%; "
                  f"ROUGE-L of the tuned answers against the base answers: "
                  f"{drift['rouge-l_to_base']:.1f} (100 = unchanged).", ""]  # fmt: skip
        if "delta" in drift:
            lines += [f"Retention change {drift['delta']:+.1f} ± {drift['delta_se']:.1f} "
                      f"(standard error over the items: a change under about twice that is "
                      f"within the noise of the item sample); exactly scored items gained "
                      f"{drift['exact_gained']:.0f}, lost {drift['exact_lost']:.0f}.",
                      ""]  # fmt: skip
    if speed:
        lines += [
            "## Speed (batch 1, greedy)",
            "",
            "| Model | time to first token (ms) | decode (ms/token) |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['ttft_ms']:.0f} | {v['decode_ms_per_token']:.1f} |"
                  for k, v in speed.items()]  # fmt: skip
        lines.append("")
    if any(it.kind == "identity" for it in items):
        lines += ["## Identity", "", *_failures(labels, items, answers, scores), ""]
    lines += [f"![{c}]({c})" for c in charts]
    lines += ["", "Every answer with its scores: `answers.jsonl`; all figures: `report.json`."]
    return "\n".join(lines) + "\n"


def _bars(path: Path, title: str, groups: list[str], series: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 125)  # room for the legend above the tallest bars
    ax.set_ylabel("score (0-100)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def charts(folder: Path, labels: list[str], rows: list[Row], items: list[Item],
           scores: dict[str, list[dict[str, Any]]]) -> list[str]:  # fmt: skip
    """identity.png (accuracy per language) and retention.png (score per item kind)."""
    out = []
    ident = [r for r in rows if r.dataset == "identity"]
    if ident:
        langs = list(dict.fromkeys(r.subset for r in ident))
        series = {m: [next(r.score for r in ident if r.model == m and r.subset == lang)
                      for lang in langs] for m in labels}  # fmt: skip
        _bars(folder / "identity.png", "Identity on held-out probes", langs, series)
        out.append("identity.png")
    ret = [i for i, it in enumerate(items) if it.dataset == "retention"]
    if ret:
        kinds = list(dict.fromkeys(items[i].kind for i in ret))
        series = {}
        for m in labels:
            series[m] = []
            for kind in kinds:
                vals = [scores[m][i]["score"] for i in ret if items[i].kind == kind]
                series[m].append(sum(vals) / len(vals))
        _bars(folder / "retention.png", "Retention by item kind (open: ROUGE-L)", kinds, series)
        out.append("retention.png")
    return out


def write_report(out: Path, meta: dict[str, Any], labels: list[str], items: list[Item],
                 convs: list[list[dict[str, str]]], answers: dict[str, list[str]],
                 scores: dict[str, list[dict[str, Any]]], rows: list[Row],
                 speed: dict[str, dict[str, float]],
                 drift: dict[str, float] | None) -> None:  # fmt: skip
    """Write the report folder ``out`` in one piece (a temporary folder renamed at the end)."""
    with atomic_dir(out) as tmp:
        names = charts(tmp, labels, rows, items, scores)
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            for label in labels:
                for i, it in enumerate(items):
                    row = {"model": label, "dataset": it.dataset, "id": it.id, "kind": it.kind,
                           "lang": it.lang, "messages": convs[i], "response": answers[label][i],
                           "labels": it.reference, **scores[label][i]}  # fmt: skip
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = [r.__dict__ for r in rows]
        report = {"meta": meta, "summary": summary, "speed": speed, "moved": drift}
        (tmp / "report.json").write_text(
            json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        text = markdown(meta, labels, items, answers, scores, rows, speed, drift, names)
        (tmp / "report.md").write_text(text, encoding="utf-8")
