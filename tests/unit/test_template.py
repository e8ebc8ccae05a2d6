"""Conversation -> input_ids + labels with the tiny Qwen2.5-style tokenizer and chat template."""

from __future__ import annotations

import pytest

from tiny import DEFAULT_SYSTEM_PROMPT, IM_END
from tunesmith.data import tokenize as tokenize_mod
from tunesmith.data.messages import Conversation, Message
from tunesmith.data.template import IGNORE, EncodeStats, encode, encode_all

SINGLE = Conversation(
    [
        Message("system", "You are a helpful assistant."),
        Message("user", "What is the capital of France?"),
        Message("assistant", "The capital of France is Paris."),
    ],
    origin="test:1",
)

MULTI = Conversation(
    [
        Message("user", "Hello, world!"),
        Message("assistant", "I am fine, thank you."),
        Message("user", "Write a short poem about the sea."),
        Message("assistant", "The wind and the stars at night,\nthe sea is calm."),
        Message("user", "def add(a, b):"),
        Message("assistant", "def add(a, b):\n    return a + b\n"),
    ],
    origin="test:2",
)

CHINESE = Conversation(
    [
        Message("user", "你好，世界！今天天气怎么样？"),
        Message("assistant", "我是一个人工智能助手，很高兴为你服务。"),
        Message("user", "中国的首都是哪里？"),
        Message("assistant", "中国的首都是北京。Qwen 是阿里云开发的大语言模型。"),
    ]
)


def replies(conv: Conversation) -> list[str]:
    return [m.content for m in conv.messages if m.role == "assistant"]


def labelled_runs(sample) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive trained tokens."""
    runs = []
    start = None
    for i, lab in enumerate([*sample.labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_labels(tok, conv: Conversation, sample, expected_replies: list[str]) -> None:
    """Labels equal input_ids exactly on each expected reply + <|im_end|>, -100 elsewhere."""
    text = tok.apply_chat_template(conv.as_dicts(), tokenize=False, add_generation_prompt=False)
    assert tok.decode(sample.input_ids) == text
    assert len(sample.labels) == len(sample.input_ids)
    for t, lab in zip(sample.input_ids, sample.labels, strict=True):
        assert lab in (IGNORE, t)
    runs = labelled_runs(sample)
    decoded = [tok.decode(sample.input_ids[s:e]) for s, e in runs]
    assert decoded == [r + IM_END for r in expected_replies]
    newline = tok.encode("\n", add_special_tokens=False)
    for _s, e in runs:
        # Each run ends on <|im_end|>; the template's newline after it carries no loss.
        assert sample.input_ids[e - 1] == tok.eos_token_id
        assert sample.input_ids[e : e + len(newline)] == newline
        assert sample.labels[e] == IGNORE
    assert sample.n_trained == sum(e - s for s, e in runs)


def test_single_turn(tiny_tokenizer) -> None:
    sample = encode(tiny_tokenizer, SINGLE, max_length=2048)
    assert sample is not None
    check_labels(tiny_tokenizer, SINGLE, sample, replies(SINGLE))
    assert sample.origin == "test:1"
    # System, user and template text are never trained.
    first_trained = labelled_runs(sample)[0][0]
    prompt = tiny_tokenizer.decode(sample.input_ids[:first_trained])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in prompt
    assert "You are a helpful assistant." in prompt


def test_multi_turn_every_reply_is_trained(tiny_tokenizer) -> None:
    sample = encode(tiny_tokenizer, MULTI, max_length=2048)
    assert sample is not None
    check_labels(tiny_tokenizer, MULTI, sample, replies(MULTI))
    # The template's default system prompt is there and untrained.
    assert DEFAULT_SYSTEM_PROMPT in tiny_tokenizer.decode(sample.input_ids)


def test_last_round_trains_only_the_last_reply(tiny_tokenizer) -> None:
    full = encode(tiny_tokenizer, MULTI, max_length=2048)
    last = encode(tiny_tokenizer, MULTI, max_length=2048, loss_scale="last_round")
    assert last is not None and full is not None
    assert last.input_ids == full.input_ids
    check_labels(tiny_tokenizer, MULTI, last, replies(MULTI)[-1:])
    last_run = labelled_runs(full)[-1]
    assert labelled_runs(last) == [last_run]


def test_chinese_content(tiny_tokenizer) -> None:
    sample = encode(tiny_tokenizer, CHINESE, max_length=2048)
    assert sample is not None
    check_labels(tiny_tokenizer, CHINESE, sample, replies(CHINESE))


def test_system_flag_applies_only_without_a_record_system(tiny_tokenizer) -> None:
    no_system = Conversation([Message("user", "Hello"), Message("assistant", "Hi there.")])
    assert no_system.system is None
    assert no_system.with_system(None) is no_system
    with_flag = no_system.with_system("Be brief.")
    assert with_flag.system == "Be brief."
    assert [m.role for m in with_flag.messages] == ["system", "user", "assistant"]
    assert no_system.system is None  # not modified in place
    # A record's own system prompt wins over --system.
    assert SINGLE.with_system("Be brief.") is SINGLE
    assert SINGLE.with_system("Be brief.").system == "You are a helpful assistant."

    samples, stats = encode_all(
        tiny_tokenizer,
        [no_system, SINGLE],
        system="Be brief.",
        max_length=2048,
        truncation="delete",
        loss_scale="default",
    )
    assert stats.samples == 2
    first, second = (tiny_tokenizer.decode(s.input_ids) for s in samples)
    assert "Be brief." in first and DEFAULT_SYSTEM_PROMPT not in first
    assert "Be brief." not in second and "You are a helpful assistant." in second
    check_labels(tiny_tokenizer, with_flag, samples[0], ["Hi there."])


def test_no_system_flag_keeps_the_template_default(tiny_tokenizer) -> None:
    conv = Conversation([Message("user", "Hello"), Message("assistant", "Hi there.")])
    samples, _ = encode_all(
        tiny_tokenizer,
        [conv],
        system=None,
        max_length=2048,
        truncation="delete",
        loss_scale="default",
    )
    assert DEFAULT_SYSTEM_PROMPT in tiny_tokenizer.decode(samples[0].input_ids)


# --- truncation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_multi(tiny_tokenizer):
    return encode(tiny_tokenizer, MULTI, max_length=100_000)


def test_short_enough_is_not_truncated(tiny_tokenizer, full_multi) -> None:
    stats = EncodeStats()
    n = len(full_multi.input_ids)
    for strategy in ("delete", "left", "right"):
        sample = encode(tiny_tokenizer, MULTI, max_length=n, truncation=strategy, stats=stats)
        assert sample is not None and sample.input_ids == full_multi.input_ids
    assert (stats.samples, stats.deleted, stats.truncated, stats.no_labels) == (3, 0, 0, 0)


def test_truncation_delete(tiny_tokenizer, full_multi) -> None:
    stats = EncodeStats()
    n = len(full_multi.input_ids)
    assert encode(tiny_tokenizer, MULTI, max_length=n - 1, stats=stats) is None
    assert (stats.samples, stats.deleted, stats.truncated, stats.no_labels) == (0, 1, 0, 0)


def test_truncation_left_keeps_the_end(tiny_tokenizer, full_multi) -> None:
    stats = EncodeStats()
    sample = encode(tiny_tokenizer, MULTI, max_length=30, truncation="left", stats=stats)
    assert sample is not None
    assert sample.input_ids == full_multi.input_ids[-30:]
    assert sample.labels == full_multi.labels[-30:]
    assert (stats.samples, stats.deleted, stats.truncated, stats.no_labels) == (1, 0, 1, 0)


def test_truncation_right_keeps_the_start(tiny_tokenizer, full_multi) -> None:
    stats = EncodeStats()
    # Cut inside the first reply: the prompt and part of the reply remain.
    first_run = labelled_runs(full_multi)[0]
    cut = first_run[0] + 2
    sample = encode(tiny_tokenizer, MULTI, max_length=cut, truncation="right", stats=stats)
    assert sample is not None
    assert sample.input_ids == full_multi.input_ids[:cut]
    assert sample.labels == full_multi.labels[:cut]
    assert sample.n_trained == 2
    assert (stats.samples, stats.deleted, stats.truncated, stats.no_labels) == (1, 0, 1, 0)


def test_truncation_that_removes_every_label_drops_the_sample(tiny_tokenizer, full_multi) -> None:
    stats = EncodeStats()
    first_trained = labelled_runs(full_multi)[0][0]
    assert (
        encode(tiny_tokenizer, MULTI, max_length=first_trained, truncation="right", stats=stats)
        is None
    )
    assert stats.samples == 0 and stats.no_labels == 1 and stats.truncated == 1


def test_encode_all_counts(tiny_tokenizer, full_multi) -> None:
    short = Conversation([Message("user", "Hello"), Message("assistant", "Hi there.")])
    samples, stats = encode_all(
        tiny_tokenizer,
        [short, MULTI, short],
        system=None,
        max_length=len(full_multi.input_ids) - 1,
        truncation="delete",
        loss_scale="default",
    )
    assert len(samples) == 2
    assert (stats.samples, stats.deleted) == (2, 1)


def test_tokenize_dataset_matches_encode_and_is_cached(tiny_tokenizer, monkeypatch) -> None:
    convs = [SINGLE, MULTI, CHINESE]
    settings = {"max_length": 2048, "truncation": "delete", "loss_scale": "default"}
    samples, stats = tokenize_mod.tokenize_dataset(
        tiny_tokenizer, convs, system="Be brief.", progress=False, **settings
    )
    expected = [
        encode(
            tiny_tokenizer,
            c.with_system("Be brief."),
            **{"max_length": 2048, "truncation": "delete", "loss_scale": "default"},
        )
        for c in convs
    ]
    assert [(s.input_ids, s.labels, s.origin) for s in samples] == [
        (s.input_ids, s.labels, s.origin) for s in expected
    ]
    assert stats.samples == 3

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(tokenize_mod, "encode_batch", no_tokenizing)
    cached, cached_stats = tokenize_mod.tokenize_dataset(
        tiny_tokenizer, convs, system="Be brief.", progress=False, **settings
    )
    assert [(s.input_ids, s.labels, s.origin, s.tags) for s in cached] == [
        (s.input_ids, s.labels, s.origin, s.tags) for s in samples
    ]
    assert cached_stats == stats
    # Any change of what the result depends on misses the cache.
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_mod.tokenize_dataset(
            tiny_tokenizer, convs, system="Be verbose.", progress=False, **settings
        )
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_mod.tokenize_dataset(
            tiny_tokenizer,
            convs,
            system="Be brief.",
            progress=False,
            **(settings | {"loss_scale": "last_round"}),
        )
