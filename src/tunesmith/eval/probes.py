"""Identity: does the model answer held-out questions about itself with its new name?

The probes are the builtin ``identity_probes.jsonl`` (none of them is a training template of
the self-cognition set; a test checks it). A probe passes when the answer names the configured
name or author (in either language) and does not claim the base model's identity.

"Claims" rather than "mentions": a tuned model that answers "你和通义千问是什么关系？"
with "我和通义千问没有关系，我是小智" is right. So the answer is cut into clauses, and a clause
that names the base identity claims it unless it also holds a negation (not, no, 不, 没, 无, 非 …).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.data.self_cognition import identity_probes

# Clauses, not only sentences: "I'm not ChatGPT, I am Qwen" claims Qwen in its second clause.
_CLAUSES = re.compile(r"[^,.!?;，、。！？；\n]+")
_NEGATION_EN = re.compile(
    r"\b(not|no|never|neither|nor|unrelated|different|rather than|instead of)\b|n't", re.I
)
_NEGATION_ZH = re.compile(r"不|没|无|非|并非|而非|区别")


@dataclass
class Verdict:
    """How one identity answer was judged."""

    passed: bool
    """Names the configured identity and claims no base identity."""
    reason: str
    """Why it failed ("" when it passed): missing name, or the base name it claims."""


def probe_items(lang: str | None = None) -> list[dict[str, str]]:
    """The held-out identity questions ``[{"query", "lang"}]`` (both languages by default)."""
    return identity_probes(lang)


def _contains(text: str, needle: str) -> bool:
    # Latin names match whole words, case-insensitively ("Qwen" in "Qwen2.5", not in "Qwent").
    if needle.isascii():
        return re.search(rf"(?<![A-Za-z]){re.escape(needle)}(?![a-z])", text, re.I) is not None
    return needle in text


def claimed_base(answer: str, base_identity: list[str] | tuple[str, ...]) -> str | None:
    """The first base name that a clause of ``answer`` claims (names, not negated)."""
    for sentence in _CLAUSES.findall(answer):
        negated = _NEGATION_EN.search(sentence) or _NEGATION_ZH.search(sentence)
        if negated:
            continue
        for name in base_identity:
            if _contains(sentence, name):
                return name
    return None


def judge(answer: str, identity: list[str], base_identity: list[str] | tuple[str, ...]) -> Verdict:
    """Judge one answer: must name one of ``identity`` (name/author, any language) and claim
    none of ``base_identity``."""
    base = claimed_base(answer, base_identity)
    if base is not None:
        return Verdict(False, f"claims the base identity ({base})")
    if not any(_contains(answer, name) for name in identity):
        return Verdict(False, "names neither " + " nor ".join(identity))
    return Verdict(True, "")
