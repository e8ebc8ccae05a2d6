"""Text metrics: BLEU-4 (sacrebleu), ROUGE-1/2/L (rouge-score), exact match; all on 0–100.

Chinese has no spaces between words, so it is never scored on whitespace tokens: BLEU uses
sacrebleu's ``zh`` tokenizer (every CJK character a token), ROUGE a per-character tokenizer
(rouge-score's default one drops everything that is not ASCII, which would score every Chinese
answer 0.0, the silent zero users of other tools complain about). A text is treated as Chinese
when it contains a CJK character.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from typing import Any

from tunesmith.utils import UserError

INSTALL_HINT = "pip install 'tunesmith[eval]' (sacrebleu and rouge-score)"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# One CJK character, or one run of letters/digits: the tokens of a mixed zh/en text.
_CHAR_TOKENS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


def is_chinese(text: str) -> bool:
    """Whether ``text`` has a CJK character (then it is tokenized per character)."""
    return bool(_CJK.search(text))


class CharTokenizer:
    """rouge-score tokenizer for Chinese: each CJK character is a token, as is each Latin word."""

    def tokenize(self, text: str) -> list[str]:
        """The lower-cased tokens of ``text``, punctuation dropped."""
        return _CHAR_TOKENS.findall(unicodedata.normalize("NFKC", text).lower())


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"tunesmith eval needs the {name} package: {INSTALL_HINT}") from None


@cache
def _scorer(chinese: bool) -> Any:
    rouge_scorer = _import("rouge_score.rouge_scorer")
    tokenizer = CharTokenizer() if chinese else None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=tokenizer)


def rouge(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one answer against one reference, 0–100."""
    scores = _scorer(is_chinese(reference) or is_chinese(hypothesis)).score(reference, hypothesis)
    return {name: 100 * scores[name].fmeasure for name in ROUGE_TYPES}


def bleu_tokenizer(texts: list[str]) -> str:
    """sacrebleu's ``zh`` tokenizer when any of ``texts`` is Chinese, else its default ``13a``."""
    return "zh" if any(is_chinese(t) for t in texts) else "13a"


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """BLEU-4 of one answer, 0–100, with exponential smoothing (sentence BLEU is otherwise 0
    as soon as one 4-gram order has no match)."""
    sacrebleu = _import("sacrebleu")
    tok = bleu_tokenizer([reference])
    return sacrebleu.sentence_bleu(hypothesis, [reference], tokenize=tok).score


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 of answers against one reference each, 0–100 (0 for no answers)."""
    if not hypotheses:
        return 0.0
    sacrebleu = _import("sacrebleu")
    tok = bleu_tokenizer(references)
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tok).score


def normalize(text: str) -> str:
    """Text compared by exact match: NFKC, lower case, whitespace collapsed, trailing full
    stops dropped ("Paris." equals "paris")."""
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return text.rstrip(".。!！ ")


def exact_match(hypothesis: str, reference: str) -> float:
    """100 when the normalized answer equals the normalized reference, else 0."""
    return 100.0 if normalize(hypothesis) == normalize(reference) else 0.0


def text_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """Every reference-based metric of one answer: bleu-4, rouge-1/2/l, exact_match (0–100)."""
    r = rouge(hypothesis, reference)
    return {
        "bleu-4": sentence_bleu(hypothesis, reference),
        "rouge-1": r["rouge1"],
        "rouge-2": r["rouge2"],
        "rouge-l": r["rougeL"],
        "exact_match": exact_match(hypothesis, reference),
    }


def check_installed() -> None:
    """Fail early, before any model is loaded, when a metric library is missing."""
    _import("sacrebleu")
    _import("rouge_score.rouge_scorer")
