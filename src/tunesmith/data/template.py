"""Conversation -> ``input_ids`` + ``labels`` with the model tokenizer's own chat template.

Labels are -100 everywhere except the assistant replies and their end-of-turn token, so the
loss only teaches the model what it should say. Assistant spans are found in characters
(rendering the conversation up to each reply), then mapped to tokens with the fast
tokenizer's offsets: this works for any chat template, not one hard-coded format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.messages import Conversation
from tunesmith.utils import IGNORE, UserError


@dataclass
class Sample:
    """One tokenized training sample."""

    input_ids: list[int]
    """Token ids of the whole rendered conversation."""
    labels: list[int]
    """``input_ids`` where the model is trained, -100 elsewhere."""
    origin: str = ""
    """Where the record came from."""
    tags: dict[str, str] = field(default_factory=dict)
    """Labels carried from the Conversation (e.g. ``lang``)."""

    @property
    def n_trained(self) -> int:
        """Number of tokens that carry loss."""
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class EncodeStats:
    """Counts reported after tokenizing a dataset."""

    samples: int = 0
    """Samples kept."""
    deleted: int = 0
    """Samples dropped because they were longer than --max_length (truncation 'delete')."""
    truncated: int = 0
    """Samples cut to --max_length (truncation 'left'/'right')."""
    no_labels: int = 0
    """Samples dropped because truncation left no trained token."""


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    tokenizer: Any, conv: Conversation, loss_scale: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant replies that carry loss.

    Each span runs from the start of the reply to the end of the end-of-turn token
    (``<|im_end|>`` for ChatML), leaving out what the template adds after it (a newline).
    """
    msgs = conv.as_dicts()
    full = render(tokenizer, msgs, add_generation_prompt=False)
    eot = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, msgs[:i], add_generation_prompt=True))
        end = start + len(m["content"])
        # Fast path (one render per reply): the template copied the reply verbatim and closed
        # it with the end-of-turn token. Otherwise render up to the reply to find its end.
        if full.startswith(m["content"], start) and (not eot or full.startswith(eot, end)):
            end += len(eot)
        else:
            upto = render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
            if not full.startswith(upto):
                raise ValueError(
                    f"{conv.origin}: the chat template does not render turns incrementally"
                )
            end = len(upto)
            cut = full.rfind(eot, start, end) if eot else -1
            if cut >= 0:
                end = cut + len(eot)
        spans.append((start, end))
    if loss_scale == "last_round":
        spans = spans[-1:]
    return full, spans


def encode(
    tokenizer: Any,
    conv: Conversation,
    *,
    max_length: int,
    truncation: str = "delete",
    loss_scale: str = "default",
    stats: EncodeStats | None = None,
) -> Sample | None:
    """Tokenize one conversation; None when it is dropped (too long, or nothing to learn)."""
    text, spans = assistant_spans(tokenizer, conv, loss_scale)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return finish(
        conv, enc["input_ids"], enc["offset_mapping"], spans, max_length, truncation, stats
    )


def finish(
    conv: Conversation,
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    max_length: int,
    truncation: str,
    stats: EncodeStats | None,
) -> Sample | None:
    """Labels from token offsets and assistant spans, then truncation; None when dropped."""
    stats = stats if stats is not None else EncodeStats()
    labels = [IGNORE] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and e > s:
            labels[t] = ids[t]
    if len(ids) > max_length:
        if truncation == "delete":
            stats.deleted += 1
            return None
        stats.truncated += 1
        if truncation == "left":
            ids, labels = ids[-max_length:], labels[-max_length:]
        else:
            ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE for t in labels):
        stats.no_labels += 1
        return None
    stats.samples += 1
    return Sample(list(ids), labels, conv.origin, conv.tags)


def encode_batch(
    tokenizer: Any,
    convs: list[Conversation],
    *,
    max_length: int,
    truncation: str,
    loss_scale: str,
) -> tuple[list[Sample | None], EncodeStats]:
    """Tokenize many conversations at once (the fast tokenizer batches in Rust)."""
    stats = EncodeStats()
    rendered = [assistant_spans(tokenizer, c, loss_scale) for c in convs]
    out: list[Sample | None] = [None] * len(convs)
    # With 'delete', a text longer than max_length of the longest tokens cannot fit: drop it
    # without tokenizing (a 10 MB record takes ~20 s to tokenize, only to be deleted).
    limit = 2 * max_length * _longest_token(tokenizer) if truncation == "delete" else None
    todo = [i for i, (text, _) in enumerate(rendered) if limit is None or len(text) <= limit]
    stats.deleted += len(convs) - len(todo)
    if not todo:
        return out, stats
    texts = [rendered[i][0] for i in todo]
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # the Rust tokenizer panics (a BaseException) on some inputs
        _raise_for_failing_record(tokenizer, [convs[i] for i in todo], texts)
        raise
    for i, ids, offs in zip(todo, enc["input_ids"], enc["offset_mapping"], strict=True):
        out[i] = finish(convs[i], ids, offs, rendered[i][1], max_length, truncation, stats)
    return out, stats


def _longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest token: no token covers more of a text."""
    cached = getattr(tokenizer, "_tunesmith_longest_token", None)
    if cached is None:
        cached = max(map(len, tokenizer.get_vocab()), default=1)
        tokenizer._tunesmith_longest_token = cached
    return cached


def _raise_for_failing_record(tokenizer: Any, convs: list[Conversation], texts: list[str]) -> None:
    """Tokenize one by one to name the record the tokenizer fails on."""
    for conv, text in zip(convs, texts, strict=True):
        try:
            tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise UserError(
                f"{conv.origin}: the tokenizer fails on this record ({type(e).__name__}); "
                "look for unusual content such as megabytes of repeated whitespace"
            ) from None


def encode_all(
    tokenizer: Any,
    convs: list[Conversation],
    *,
    system: str | None,
    max_length: int,
    truncation: str = "delete",
    loss_scale: str = "default",
) -> tuple[list[Sample], EncodeStats]:
    """Tokenize a dataset in memory (``--system`` applied where a record has none)."""
    out, stats = encode_batch(
        tokenizer,
        [c.with_system(system) for c in convs],
        max_length=max_length,
        truncation=truncation,
        loss_scale=loss_scale,
    )
    return [s for s in out if s is not None], stats
