"""Tiny, fully offline Qwen2 chat model + tokenizer for fast unit tests.

Everything is built in-process: no network access, no cached files. The tokenizer is a real
byte-level BPE (``tokenizers`` library) trained on a small built-in English + Chinese corpus with
the same normalizer / pre-tokenizer / decoder pipeline as Qwen2.5, wrapped in
:class:`transformers.Qwen2Tokenizer` (a ``PreTrainedTokenizerFast``). The model is a randomly
initialised 2-layer :class:`transformers.Qwen2ForCausalLM`.

Typical use::

    from tiny import build_tiny_model, build_tiny_tokenizer, save_tiny

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model_dir = save_tiny(tmp_path / "tiny-qwen")  # AutoModelForCausalLM / AutoTokenizer load it
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "TEMPLATE_PATH",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "save_tiny",
]

TEMPLATE_PATH = Path(__file__).with_name("qwen2_chat_template.jinja")
CHAT_TEMPLATE: str = TEMPLATE_PATH.read_text(encoding="utf-8")
"""The verbatim Qwen2.5-Instruct chat template."""

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

ENDOFTEXT = "<|endoftext|>"  # pad token (and the model config's bos id, as in Qwen2.5)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos token

# Special tokens in Qwen2.5 id order (151643, 151644, 151645 there; appended after the BPE vocab
# here), followed by the two non-special added tokens used by the tool-calling template.
_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
_NON_SPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>")

# Exactly Qwen2's pre-tokenization regex.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_BPE_VOCAB_SIZE = 1000  # target size of the trained BPE vocab (256 byte symbols + merges)
_MAX_POSITIONS = 32768

_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "You are a helpful assistant. Please answer the question below.",
    "The user asked a question and the assistant gave a short, helpful answer.",
    "Machine learning models are trained on large amounts of text data.",
    "Fine-tuning adapts a pretrained language model to a new task with less data.",
    "LoRA adds small low-rank matrices to the attention and MLP layers of the model.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "Please translate the following sentence into Chinese.",
    "Summarize this article in three sentences, and keep the most important facts.",
    "The weather is nice today, so we are going to the park this afternoon.",
    "There are 365 days in a year, 24 hours in a day and 60 minutes in an hour.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    'for i in range(10):\n    if i % 2 == 0:\n        print(f"{i} is even")\n',
    '{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}',
    "system\nuser\nassistant\ntool\n",
    "It's a test. They're here, we've done it, I'm sure you'll see what he'd say.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2024-01-01 12:30:45",
    "Punctuation: ... !!! ??? --- *** ### ``` () [] {} <> / \\ | @ $ % ^ & _ = + ~",
    "你好，世界！今天天气怎么样？",
    "我是一个人工智能助手，很高兴为你服务。",
    "请把下面的句子翻译成英文。",
    "机器学习模型需要大量的数据进行训练。",
    "微调可以让预训练的语言模型适应新的任务。",
    "中国的首都是北京，上海是一个国际化的大城市。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "请用三句话总结这篇文章的主要内容。",
    "我们今天下午去公园散步，因为天气很好。",
    "一年有三百六十五天，一天有二十四个小时。",
    "这是一个测试句子，用来检查分词器是否正确。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "大语言模型可以回答问题、写代码、翻译和总结文本。",
    "Mixed 中英文 text: 我喜欢 Python 和 machine learning。",
    "Qwen 是阿里云开发的大语言模型。Qwen is a large language model developed by Alibaba Cloud.",
)
_CORPUS_REPEATS = 3


def _byte_level_bpe_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """Install Qwen2's normalizer, pre-tokenizer and decoder on ``tokenizer`` (in place)."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on the built-in corpus; return ``(vocab, merges)``.

    The initial alphabet is the full 256-symbol byte-level alphabet, so any UTF-8 text can be
    encoded without unknown tokens.
    """
    tokenizer = _byte_level_bpe_pipeline(Tokenizer(BPE(unk_token=None, fuse_unk=False)))
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(
        (line for _ in range(_CORPUS_REPEATS) for line in _CORPUS), trainer=trainer
    )
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, merges  # type: ignore[return-value]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a tiny, deterministic Qwen2.5-style fast tokenizer fully in-process.

    * Byte-level BPE (~1000 tokens) with Qwen2's NFC normalizer, regex split pre-tokenizer and
      byte-level decoder: any (NFC) UTF-8 text, Chinese included, round-trips exactly through
      ``encode``/``decode``, and ``return_offsets_mapping=True`` works.
    * Special tokens as in Qwen2.5: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>``
      (eos); no bos/unk token; nothing is added on ``encode``. They get ids 1000, 1001, 1002
      (right after the 1000-token BPE vocab, same order as Qwen2.5), followed by the non-special
      added tokens ``<tool_call>``/``</tool_call>`` (1003, 1004); ``len(tokenizer) == 1005``.
    * ``chat_template`` is the verbatim Qwen2.5-Instruct template.

    Returns:
        A :class:`transformers.Qwen2Tokenizer` (subclass of ``PreTrainedTokenizerFast``).
    """
    vocab, merges = _train_bpe()
    for token in (*_SPECIAL_TOKENS, *_NON_SPECIAL_ADDED_TOKENS):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        add_prefix_space=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MAX_POSITIONS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    # Qwen2Tokenizer registers its special tokens itself; register the tool-call markers as
    # ordinary (non-special) added tokens exactly like Qwen2.5 does.
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in _NON_SPECIAL_ADDED_TOKENS]
    )
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen2ForCausalLM:
    """Build a tiny randomly initialised Qwen2 causal LM matching ``tokenizer``.

    hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, untied embeddings, SDPA
    attention, ``vocab_size == len(tokenizer)``. ``pad_token_id``/``eos_token_id`` come from the
    tokenizer; ``bos_token_id`` is the ``<|endoftext|>`` id (as in Qwen2.5 configs, since the
    tokenizer has no bos token). ``generation_config.eos_token_id`` is the ``<|im_end|>`` id.

    Weights depend only on ``seed`` (the global torch RNG state is left untouched). The model is
    returned in eval mode, like ``from_pretrained``.
    """
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext_id
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else im_end_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else endoftext_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=im_end_id,
        pad_token_id=pad_id,
        do_sample=False,
    )
    return model.eval()


def save_tiny(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny model + tokenizer (``save_pretrained``) to ``path`` and return it as a Path.

    The directory is a regular local HF model dir: ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load it back (chat template included).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
