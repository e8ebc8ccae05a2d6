"""An Ollama model folder: the GGUF file and a ``Modelfile`` with the ChatML prompt template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.model.gguf_write import write_gguf
from tunesmith.utils import UserError, atomic_dir, logger

# Ollama's Go-template rendering of ChatML, the format of Qwen2.5's and SmolLM2's chat
# templates: each message as <|im_start|>role\ncontent<|im_end|>\n, then the assistant's
# header. The system prompt (SYSTEM below, or the request's own) comes first, as in the
# tokenizer's template. Tool calls are left out: tunesmith trains plain chat.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

STOP_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template adds when a conversation has none (Qwen2.5 and
    SmolLM2 have one), so the Ollama model behaves like the HF one without a SYSTEM line."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=False
    )
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head) : text.index("<|im_end|>")]
    return None


def modelfile(tokenizer: Any, system: str | None, gguf_name: str = "model.gguf") -> str:
    """The Modelfile text: FROM the GGUF, the ChatML TEMPLATE, SYSTEM and stop PARAMETERs.

    ``system`` is the run's system prompt (args.json); without one, the chat template's own
    default is written, since Ollama does not run the Jinja template itself.
    """
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise UserError(
            "--to ollama knows the ChatML chat template (Qwen2.5, SmolLM2) only, and this "
            "model's template is different; use --to gguf (llama.cpp reads the template from "
            "the file)"
        )
    system = system if system is not None else default_system(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML_TEMPLATE}"""']
    if system:
        if '"""' in system:
            raise UserError('--to ollama: the system prompt must not contain """')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    return "\n".join(lines) + "\n"


def write_ollama(
    model: Any, tokenizer: Any, out: Path, gguf_type: str, system: str | None, name: str
) -> Path:
    """Write ``out/model.gguf`` and ``out/Modelfile``; the folder appears only when complete."""
    text = modelfile(tokenizer, system)  # refuse before the slow part
    try:
        with atomic_dir(out) as tmp:
            write_gguf(model, tokenizer, tmp / "model.gguf", gguf_type, name=name)
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the Ollama folder {out} ({e.strerror or e})") from None
    logger.info(f"Ollama model folder written: {out}; run: ollama create NAME -f {out}/Modelfile")
    return out
