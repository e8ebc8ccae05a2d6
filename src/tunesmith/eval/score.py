"""Score answers item by item, and sum them up into ms-swift's table rows.

Every score is on 0–100. A row is ``(model, dataset, metric, subset, num, score)``, the shape of
``swift eval``'s summary table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tunesmith.eval.items import Item
from tunesmith.eval.metrics import corpus_bleu, rouge, text_scores
from tunesmith.eval.probes import judge
from tunesmith.eval.retention import EXACT_KINDS, score_item

METRICS = ("bleu", "rouge", "exact_match")
"""Metrics of reference-answer datasets (``--metrics``); multiple choice is always accuracy."""


@dataclass
class Row:
    """One line of the summary table."""

    model: str
    """Which model (the base's name, or the checkpoint)."""
    dataset: str
    """identity, retention, or the --eval_dataset value."""
    metric: str
    """acc, score, bleu-4, rouge-l, …"""
    subset: str
    """zh, en, or ALL."""
    num: int
    """Items behind the score."""
    score: float
    """0–100."""


def pick_letter(answer: str, letters: str) -> str | None:
    """The option letter a multiple-choice answer picks: "答案：B", "the answer is (B)", a
    leading "B." or the first letter standing alone; None when there is none."""
    cls = f"[{letters}]"
    explicit = re.search(
        rf"(?:答案|选项|answer|option)\s*(?:是|为|应该是|is|:|：)?\s*[(\[（]?({cls})(?![A-Za-z])",
        answer,
        re.I,
    )
    if explicit:
        return explicit.group(1).upper()
    alone = re.search(rf"(?<![A-Za-z]){cls}(?![A-Za-z])", answer)
    return alone.group(0) if alone else None


def score_answer(
    item: Item, answer: str, identity: list[str], base_identity: list[str]
) -> dict[str, Any]:
    """The scores of one answer: always ``score`` (0–100) and ``passed`` (None for graded
    answers), plus the kind's own fields (reason, picked letter, BLEU/ROUGE)."""
    if item.kind == "identity":
        verdict = judge(answer, identity, base_identity)
        return {"score": 100.0 if verdict.passed else 0.0, "passed": verdict.passed,
                "reason": verdict.reason}  # fmt: skip
    if item.kind == "mcq":
        picked = pick_letter(answer, "".join(item.extra["options"]))
        ok = picked == item.reference
        return {"score": 100.0 if ok else 0.0, "passed": ok, "picked": picked}
    if item.kind == "qa":
        scores = text_scores(answer, item.reference or "")
        return {"score": scores["rouge-l"], "passed": None, **scores}
    return score_item(item.extra, answer)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _by_lang(items: list[Item], scores: list[dict[str, Any]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.lang, []).append(i)
    return dict(sorted(groups.items(), key=lambda kv: kv[0] != "zh"))


def dataset_rows(
    model: str, name: str, items: list[Item], scores: list[dict[str, Any]], answers: list[str],
    metrics: list[str],
) -> list[Row]:  # fmt: skip
    """The summary rows of one model on one dataset."""
    n = len(items)
    if name == "identity":
        return [Row(model, name, "acc", lang, len(ix), _mean([scores[i]["score"] for i in ix]))
                for lang, ix in _by_lang(items, scores).items()]  # fmt: skip
    if name == "retention":
        rows = [Row(model, name, "score", lang, len(ix), _mean([scores[i]["score"] for i in ix]))
                for lang, ix in _by_lang(items, scores).items()]  # fmt: skip
        rows.append(Row(model, name, "score", "ALL", n, _mean([s["score"] for s in scores])))
        exact = [s["score"] for it, s in zip(items, scores, strict=True) if it.kind in EXACT_KINDS]
        rows.append(Row(model, name, "exact_acc", "ALL", len(exact), _mean(exact)))
        opened = [i for i, it in enumerate(items) if it.kind == "open"]
        if opened:
            hyps, refs = [answers[i] for i in opened], [items[i].reference or "" for i in opened]
            rows.append(Row(model, name, "bleu-4", "ALL", len(opened), corpus_bleu(hyps, refs)))
            rouge_l = _mean([scores[i]["rouge-l"] for i in opened])
            rows.append(Row(model, name, "rouge-l", "ALL", len(opened), rouge_l))
        return rows
    if items and items[0].kind == "mcq":
        return [Row(model, name, "acc", "default", n, _mean([s["score"] for s in scores]))]
    rows = []
    if "bleu" in metrics:
        refs = [it.reference or "" for it in items]
        rows.append(Row(model, name, "bleu-4", "default", n, corpus_bleu(answers, refs)))
    if "rouge" in metrics:
        for m in ("rouge-1", "rouge-2", "rouge-l"):
            rows.append(Row(model, name, m, "default", n, _mean([s[m] for s in scores])))
    if "exact_match" in metrics:
        em = _mean([s["exact_match"] for s in scores])
        rows.append(Row(model, name, "exact_match", "default", n, em))
    return rows


def moved(base_answers: list[str], tuned_answers: list[str]) -> dict[str, float]:
    """How far the tuned answers moved from the base answers to the same questions: the share
    that changed at all, and ROUGE-L F1 of each tuned answer against the base answer (100 =
    unchanged)."""
    changed = [a != b for a, b in zip(base_answers, tuned_answers, strict=True)]
    sim = [rouge(t, b)["rougeL"] if t != b else 100.0
           for b, t in zip(base_answers, tuned_answers, strict=True)]  # fmt: skip
    return {"changed_pct": 100 * _mean([float(c) for c in changed]), "rouge-l_to_base": _mean(sim)}


def paired_change(base: list[dict[str, Any]], tuned: list[dict[str, Any]]) -> dict[str, float]:
    """The score change from base to tuned over the same items, with its standard error (the
    items' paired differences; a change under about two of them is within what another draw of
    items could give), and the exactly scored items gained and lost."""
    diffs = [t["score"] - b["score"] for b, t in zip(base, tuned, strict=True)]
    n = len(diffs)
    delta = _mean(diffs)
    var = sum((d - delta) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    exact = [(b["passed"], t["passed"]) for b, t in zip(base, tuned, strict=True)
             if b["passed"] is not None]  # fmt: skip
    return {"delta": delta, "delta_se": (var / n) ** 0.5 if n else 0.0,
            "exact_gained": float(sum(t and not b for b, t in exact)),
            "exact_lost": float(sum(b and not t for b, t in exact))}  # fmt: skip
