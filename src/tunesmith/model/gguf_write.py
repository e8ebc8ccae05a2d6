"""Write a llama.cpp GGUF file from a Hugging Face model, in pure Python with the ``gguf`` package.

llama.cpp's ``convert_hf_to_gguf.py`` is the reference: the same metadata keys, tensor names,
tensor types (1-D tensors and biases stay F32) and tokenizer description (``gpt2`` byte-level
BPE with its pre-tokenizer name, token types, merges, special ids and chat template), so
llama.cpp, Ollama and transformers' GGUF loader read the file as they read llama.cpp's own.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.utils import UserError, atomic_file, human_bytes, logger

# config.json model_type -> gguf architecture name; the tensor layouts of both are plain
# decoder-only transformers (Qwen2 adds q/k/v biases), which is all this writer handles.
SUPPORTED_ARCHS = ("qwen2", "llama")

GGUF_TYPES = ("f16", "bf16", "q8_0")
"""``--gguf_type`` choices: the type of the 2-D weight matrices (norms and biases stay F32)."""

# Pre-tokenizer names llama.cpp gives these split patterns (convert_hf_to_gguf.py identifies
# them by hashing the tokenization of a test text; we recognise the pattern itself).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_SPLIT = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def check_architecture(config: Any) -> str:
    """The model's architecture if this writer supports it, else one sentence naming both."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"GGUF export does not support the architecture '{arch}' yet; supported: "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in (None, "default"):
        raise UserError(
            f"GGUF export does not support RoPE scaling ('{rope_type}') yet; only plain RoPE"
        )
    return arch


def write_gguf(
    model: Any, tokenizer: Any, out: Path, gguf_type: str = "f16", name: str | None = None
) -> Path:
    """Write ``model`` (a loaded HF causal LM) and ``tokenizer`` as one GGUF file at ``out``.

    The file is written under a temporary name in the same folder and renamed when complete,
    so ``out`` is either absent, the previous file, or the new complete one.
    """
    import gguf

    arch = check_architecture(model.config)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type {gguf_type}: expected one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    # use_temp_file: each tensor goes to a spooled temporary file as soon as it is converted,
    # so peak memory is the model plus one tensor, not the model plus the whole output.
    writer = gguf.GGUFWriter(None, arch, use_temp_file=True)
    try:
        with atomic_file(out) as tmp:
            _add_hparams(writer, model.config, gguf_type, name or _model_name(model))
            _add_tokenizer(writer, tokenizer, model.config)
            _add_tensors(writer, model, gguf_type)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as e:
        raise UserError(f"cannot write the GGUF file to {out} ({e.strerror or e})") from None
    finally:
        writer.close()
    logger.info(f"GGUF ({gguf_type}) written: {out} ({human_bytes(out.stat().st_size)})")
    return out


def _model_name(model: Any) -> str:
    path = str(getattr(model.config, "_name_or_path", "") or "model")
    return Path(path).name or "model"


def _rope_theta(config: Any) -> float | None:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return theta


def _add_hparams(writer: Any, cfg: Any, gguf_type: str, name: str) -> None:
    """Model hyper-parameters, under the keys llama.cpp's converter writes for these archs."""
    import gguf

    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    if (theta := _rope_theta(cfg)) is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if cfg.model_type == "llama":  # LlamaModel.set_gguf_parameters adds these two
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for p in parts:
        regex = (p.get("pattern") or {}).get("Regex") if p.get("type") == "Split" else None
        if regex in _PRE_BY_SPLIT:
            return _PRE_BY_SPLIT[regex]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    digits = [p for p in parts if p.get("type") == "Digits" and p.get("individual_digits")]
    if kinds == ["Digits", "ByteLevel"] and digits and byte_level[0].get("use_regex", True):
        return "smollm"  # SmolLM / SmolLM2: single digits, then GPT-2's split
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        # transformers rebuilds SmolLM's tokenizer from a GGUF file (the demo-tiny model) without
        # its digit splitting; its vocabulary, with StarCoder's markers, still says SmolLM.
        vocab = tokenizer.get_vocab()
        return "smollm" if {"<jupyter_start>", "<empty_output>"} <= vocab.keys() else "gpt-2"
    raise UserError(
        f"GGUF export does not recognise this tokenizer's pre-tokenizer ({kinds}); known: "
        "Qwen2, Llama 3, SmolLM and GPT-2 style byte-level BPE"
    )


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type, padded to the model's vocab size.

    As in convert_hf_to_gguf.py's ``get_vocab_base``: ids the tokenizer does not use become
    ``[PADn]`` (UNUSED); added tokens are CONTROL when special (or spelled ``<|…|>``), else
    USER_DEFINED; everything else is NORMAL.
    """
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only "
            f"{vocab_size} embeddings; they do not belong together"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        # A tokenizer rebuilt from a GGUF file (--model x.gguf, the demo models) has llama.cpp's
        # padding placeholders as ordinary tokens; they are still unused ids.
        if token is None or token == f"[PAD{i}]":
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        if token in added:
            if i in decoder and not decoder[i].normalized:  # llama.cpp expects them normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = i in decoder and decoder[i].special
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(TokenType.CONTROL if special or looks_special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def _add_tokenizer(writer: Any, tokenizer: Any, cfg: Any) -> None:
    """Vocabulary, merges, special ids, add-BOS flag and chat template."""
    import gguf

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("GGUF export needs a fast (tokenizer.json) byte-level BPE tokenizer")
    model_type = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"]
    if model_type != "BPE":
        raise UserError(f"GGUF export supports byte-level BPE tokenizers only, not {model_type}")
    tokens, types = vocab_tokens(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf's SpecialVocab is what llama.cpp's converter uses for merges, special ids and the
    # chat template; it reads them from files, so give it the files.
    with tempfile.TemporaryDirectory(prefix="tunesmith-tok-") as d:
        tokenizer.save_pretrained(d)
        cfg.to_json_file(os.path.join(d, "config.json"))
        special = gguf.SpecialVocab(d, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise UserError("the tokenizer has no BPE merges, so llama.cpp could not use it")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]
    special.add_special_token.setdefault("bos", adds_bos)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's LlamaModel.permute: HF's rotate-half q/k rows to interleaved pairs.

    transformers' GGUF loader applies the inverse (``_reverse_permute_weights``) on load.
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _add_tensors(writer: Any, model: Any, gguf_type: str) -> None:
    """Every weight under its llama.cpp name, matrices in ``gguf_type``, the rest F32."""
    import gguf
    import numpy as np

    cfg = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[gguf_type]
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight; writing it would untie the model
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export: no llama.cpp name for the tensor '{hf_name}'")
        data = tensor.detach().to("cpu").float().numpy()
        if cfg.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif cfg.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        # Norm weights and biases stay F32, as llama.cpp's converter keeps them.
        dtype = qtype if data.ndim > 1 and gguf_name.endswith(".weight") else None
        dtype = dtype or gguf.GGMLQuantizationType.F32
        try:
            packed = gguf.quants.quantize(np.ascontiguousarray(data), dtype)
        except gguf.QuantError:  # a row length Q8_0 cannot block: llama.cpp falls back to F16
            dtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, dtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=dtype)
