"""Sanity checks for the tiny offline Qwen2 model/tokenizer fixture in ``tests/tiny.py``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))

from tiny import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    IM_END,
    IM_START,
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny,
)

TEXTS = [
    "Hello, world!",
    "你好，世界！",
    "Mixed 中英文 text: 我喜欢 Python 和 machine learning。",
    "春眠不觉晓，处处闻啼鸟。\n\n  indented line\twith tab\r\nand CRLF",
    "罕见字：龘靐齉爨 emoji 🤖🎉 and accents: café naïve",
    "def f(x):\n    return {'a': [1, 2, 3]}\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One tokenizer shared by the module."""
    return build_tiny_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """Any (Chinese/English/emoji) text encodes without unknowns and decodes back exactly."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_no_special_tokens_added_on_encode(tokenizer: PreTrainedTokenizerFast) -> None:
    """Like Qwen2.5: no bos/eos is added by ``encode``."""
    assert tokenizer.bos_token is None
    assert tokenizer.unk_token is None
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


def test_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    """Special tokens are single ids and match Qwen2.5's roles."""
    assert tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.eos_token == IM_END
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)]
    assert ids == [1000, 1001, 1002]
    assert tokenizer.pad_token_id == ids[0]
    assert tokenizer.eos_token_id == ids[2]
    text = f"{IM_START}user\n你好{IM_END}\n{ENDOFTEXT}"
    enc = tokenizer.encode(text)
    assert enc[0] == ids[1]
    assert ids[2] in enc
    assert enc[-1] == ids[0]
    assert tokenizer.decode(enc) == text
    assert tokenizer.decode(enc, skip_special_tokens=True) == "user\n你好\n"


def test_offsets_mapping(tokenizer: PreTrainedTokenizerFast) -> None:
    """``return_offsets_mapping`` works and offsets point into the original text."""
    text = "Hello world, 你好世界!"
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert offsets[0][0] == 0
    assert offsets[-1][1] == len(text)
    assert [s for s, _ in offsets] == sorted(s for s, _ in offsets)
    ascii_text = "The quick brown fox."
    ascii_offsets = tokenizer(ascii_text, return_offsets_mapping=True)["offset_mapping"]
    assert "".join(ascii_text[s:e] for s, e in ascii_offsets) == ascii_text


def test_chat_template_default_system(tokenizer: PreTrainedTokenizerFast) -> None:
    """The Qwen2.5 template renders ChatML and injects the default system prompt."""
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello!"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], tokenize=False
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert DEFAULT_SYSTEM_PROMPT not in with_system
    ids = tokenizer.encode(rendered)
    assert tokenizer.decode(ids) == rendered
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tokenizer.eos_token_id) == 3


def test_model_config(tokenizer: PreTrainedTokenizerFast) -> None:
    """Model shape/ids follow the spec and a forward pass works."""
    model = build_tiny_model(tokenizer)
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg._attn_implementation == "sdpa"
    assert cfg.pad_token_id == tokenizer.pad_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    ids = torch.tensor([tokenizer.encode("你好 world")])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    bf16 = build_tiny_model(tokenizer, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_deterministic_builds() -> None:
    """Two builds give identical vocab and weights; the seed matters; global RNG is untouched."""
    tok_a, tok_b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert tok_a.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    rng_before = torch.get_rng_state()
    sd_a = build_tiny_model(tok_a).state_dict()
    sd_b = build_tiny_model(tok_b).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    sd_c = build_tiny_model(tok_a, seed=1).state_dict()
    assert not torch.equal(sd_a["lm_head.weight"], sd_c["lm_head.weight"])


def test_save_load_round_trip(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """``save_tiny`` writes a dir that the Auto classes load back with identical behaviour."""
    model_dir = save_tiny(tmp_path / "tiny-qwen")
    assert isinstance(model_dir, Path)
    loaded_tok = AutoTokenizer.from_pretrained(model_dir)
    loaded_model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert (loaded_tok.eos_token, loaded_tok.pad_token) == (IM_END, ENDOFTEXT)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好, tiny model!"}], tokenize=False
    )
    ids = tokenizer.encode(text)
    assert loaded_tok.encode(text) == ids
    assert (
        loaded_tok.apply_chat_template(
            [{"role": "user", "content": "你好, tiny model!"}], tokenize=False
        )
        == text
    )
    assert loaded_model.generation_config.eos_token_id == tokenizer.eos_token_id
    reference = build_tiny_model(tokenizer)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = loaded_model(input_ids=input_ids).logits
    assert torch.equal(expected, actual)


def test_peft_lora_all_linear(tokenizer: PreTrainedTokenizerFast) -> None:
    """peft LoRA with ``target_modules="all-linear"`` wraps every projection and trains."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    targeted = {
        name.rsplit(".", 1)[-1] for name in peft_model.peft_config["default"].target_modules
    }
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    peft_model.train()
    ids = torch.tensor([tokenizer.encode("我喜欢 machine learning。")])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in peft_model.named_parameters()
        if "lora_B" in n
    )


def test_build_is_fast() -> None:
    """Building the tokenizer and the model is quick (generous bound for slow CI machines)."""
    start = time.perf_counter()
    tok = build_tiny_tokenizer()
    tok_seconds = time.perf_counter() - start
    start = time.perf_counter()
    build_tiny_model(tok)
    model_seconds = time.perf_counter() - start
    assert tok_seconds < 2.0
    assert model_seconds < 2.0
