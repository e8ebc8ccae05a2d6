"""GGUF / Ollama export: llama.cpp's metadata and tensors, and the file reloads as the same model.

The tiny Qwen2 (and a tiny tied-embedding Llama) are exported through the CLI, read back with
``gguf.GGUFReader``, and reloaded through transformers' GGUF loader, the same path as
``--model file.gguf``: logits, tokenization, chat template and greedy answers must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main
from tunesmith.model.load import resolve_model

pytestmark = pytest.mark.usefixtures("isolated_torch")

TYPES = {"f16": 1, "bf16": 30, "q8_0": 8}  # --gguf_type -> GGMLQuantizationType of matrices
MESSAGES = [{"role": "user", "content": "Hello, world! 你好 <tool_call> 123"}]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen2 exported once per --gguf_type, through the CLI."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in TYPES:
        files[t] = out / f"tiny-{t}.gguf"
        argv = ["export", "--model", str(tiny_model_dir), "--to", "gguf", "--gguf_type", t]
        assert main([*argv, "--output_dir", str(files[t])]) == 0
    return files


def _fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def test_metadata_is_llama_cpps(exported: dict[str, Path], tiny_tokenizer) -> None:
    from tiny import CHAT_TEMPLATE

    f, tensors = _fields(exported["f16"])
    assert f["general.architecture"] == "qwen2" and f["general.name"] == "tiny-qwen"
    expect = {"block_count": 2, "context_length": 32768, "embedding_length": 64,
              "feed_forward_length": 128, "attention.head_count": 4,
              "attention.head_count_kv": 2}  # fmt: skip
    for key, value in expect.items():
        assert f[f"qwen2.{key}"] == value, key
    assert f["qwen2.rope.freq_base"] == pytest.approx(10000.0)
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["general.file_type"] == 1 and f["general.quantization_version"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(tiny_tokenizer) == 1005
    vocab = tiny_tokenizer.get_vocab()
    for tok, kind in [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3),
                      ("<tool_call>", 4), ("</tool_call>", 4), ("Ġthe", 1)]:  # fmt: skip
        assert tokens[vocab[tok]] == tok and types[vocab[tok]] == kind, tok
    assert len(f["tokenizer.ggml.merges"]) > 500
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|im_end|>"]
    assert f["tokenizer.ggml.padding_token_id"] == vocab["<|endoftext|>"]
    assert f["tokenizer.ggml.bos_token_id"] == vocab["<|endoftext|>"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    # Untied Qwen2: its own output matrix; q/k/v biases; norms and biases F32.
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(tensors)
    assert len(tensors) == 3 + 2 * 12
    q = tensors["blk.0.attn_q.weight"]
    assert list(q.shape) == [64, 64] and q.tensor_type == 1
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)
    assert list(tensors["token_embd.weight"].shape) == [64, 1005]
    for name in ("blk.0.attn_q.bias", "blk.0.attn_norm.weight", "output_norm.weight"):
        assert tensors[name].tensor_type == 0, name  # F32


@pytest.mark.parametrize("gguf_type", list(TYPES))
def test_matrix_types(exported: dict[str, Path], gguf_type: str) -> None:
    f, tensors = _fields(exported[gguf_type])
    assert f["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    for name in ("blk.1.ffn_down.weight", "token_embd.weight", "output.weight"):
        assert tensors[name].tensor_type == TYPES[gguf_type]
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == 0


@pytest.mark.parametrize(("gguf_type", "tol"), [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_reloaded_logits_match_the_source(
    exported: dict[str, Path], tiny_model_dir: Path, gguf_type: str, tol: float
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported[gguf_type]
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    back = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = _ids(tok)
    assert torch.equal(ids, _ids(tok_back))  # vocab, merges, pre-tokenizer, added tokens
    with torch.no_grad():
        diff = (src(ids).logits - back(ids).logits).abs().max().item()
    assert diff < tol, diff


def test_tunesmith_reloads_the_file_and_answers_the_same(
    exported: dict[str, Path], tiny_model_dir: Path
) -> None:
    """``--model file.gguf``: resolve_model converts it; the greedy answer is unchanged."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.load import load_tokenizer

    model_dir = resolve_model(str(exported["bf16"]))
    back = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    # The source rounded to bf16 once, as the bf16 file (and the bf16 cache) hold it.
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    src = src.float().eval()
    ids = _ids(tok)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert (src(ids).logits - back(ids).logits).abs().max() < 1e-4
    assert torch.equal(src.generate(ids, **kw), back.generate(ids, **kw))


def test_llama_is_permuted_and_tied_embeddings_have_no_output(
    tiny_tokenizer, tmp_path: Path
) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    src = LlamaForCausalLM(config).eval()
    src_dir = tmp_path / "tiny-llama"
    src.save_pretrained(src_dir)
    tiny_tokenizer.save_pretrained(src_dir)
    out = tmp_path / "llama.gguf"
    assert main(["export", "--model", str(src_dir), "--to", "gguf", "--output_dir", str(out)]) == 0
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.vocab_size"] == 1005
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():  # wrong q/k permutation would change the attention, not just round
        assert (src(ids).logits - back.eval()(ids).logits).abs().max() < 2e-3


# ---- adapters, Ollama ----------------------------------------------------------------------


def test_adapters_to_ollama_merges_and_writes_a_modelfile(
    checkpoint: Path, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", "--adapters", str(checkpoint), "--to", "ollama"]) == 0
    out = checkpoint.with_name("checkpoint-4-ollama")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./model.gguf\n")
    assert 'SYSTEM """Be terse."""' in text  # the run's system prompt, from args.json
    for stop in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        assert f'PARAMETER stop "{stop}"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for part in ("<|im_start|>system\n{{ .System }}<|im_end|>", "<|im_start|>user\n{{ .Content }}",
                 "<|im_start|>assistant\n", "range $i, $_ := .Messages"):  # fmt: skip
        assert part in template, part
    # The GGUF inside is the merged model: base + adapter.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, checkpoint).eval()
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = _ids(AutoTokenizer.from_pretrained(checkpoint))
    with torch.no_grad():
        a, b = adapted(ids).logits, back.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert (a - b).abs().max() < 2e-3 < (a - plain).abs().max()


def test_ollama_without_a_run_system_uses_the_templates_default(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tiny import DEFAULT_SYSTEM_PROMPT

    out = tmp_path / "ollama"
    argv = ["export", "--model", str(tiny_model_dir), "--to", "ollama", "--gguf_type", "q8_0"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in (out / "Modelfile").read_text()


# ---- bad input: one sentence, exit 2, nothing half-written -------------------------------------


def test_unsupported_architecture_is_one_sentence(
    tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=1005, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        src
    )
    tiny_tokenizer.save_pretrained(src)
    assert main(["export", "--model", str(src), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "architecture 'gpt2'" in err and "qwen2, llama" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))


def test_unwritable_output_is_one_sentence(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"  # a file where a folder should be
    blocker.write_text("x")
    for to in ("gguf", "ollama"):
        argv = ["export", "--model", str(tiny_model_dir), "--to", to]
        assert main([*argv, "--output_dir", str(blocker / "out")]) == 2
        err = capsys.readouterr().err
        assert "error: cannot write" in err and "Traceback" not in err, err
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_failed_write_leaves_no_file_under_the_final_name(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(tiny_model_dir), "--to", "gguf", "--output_dir", str(out)]
    assert main(argv) == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--adapters", str(tmp_path / "nope"), "--to", "gguf"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_push_needs_a_repo_id_and_a_token_before_exporting(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(tiny_model_dir), "--to", "gguf", "--output_dir", str(out),
            "--push_to_hub", "true"]  # fmt: skip
    assert main(argv) == 2
    assert "needs --hub_model_id" in capsys.readouterr().err
    assert main([*argv, "--hub_model_id", "me/tiny"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert not out.exists()


def test_push_offline_is_one_sentence_and_keeps_the_export(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Nothing listens on port 9: the connection is refused at once, no real network."""
    out = tmp_path / "m.gguf"
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                        "HF_TOKEN": "hf_fake", "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "export", "--model", str(tiny_model_dir),
         "--to", "gguf", "--output_dir", str(out), "--push_to_hub", "true",
         "--hub_model_id", "me/tiny"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not upload" in err[0] and "me/tiny" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr and out.is_file()


def test_a_gguf_file_can_be_retyped_beside_itself(exported: dict[str, Path]) -> None:
    src = exported["f16"]
    assert main(["export", "--model", str(src), "--to", "gguf", "--gguf_type", "q8_0"]) == 0
    out = src.with_name("tiny-f16-q8_0.gguf")  # never the input's own name
    fields, _ = _fields(out)
    assert fields["general.file_type"] == 7 and src.is_file()


def test_merge_lora_push_offline_is_one_sentence(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HF_HUB_OFFLINE=1 (set for every test): the merged folder is written, the upload refused."""
    out = tmp_path / "merged"
    argv = ["export", "--adapters", str(checkpoint), "--merge_lora", "true",
            "--output_dir", str(out), "--push_to_hub", "true", "--hub_model_id", "me/tiny",
            "--hub_token", "x"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: could not upload" in err and "Traceback" not in err
    assert (out / "config.json").is_file()
