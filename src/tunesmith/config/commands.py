"""Each subcommand's arguments: the union of a few flag groups (``groups.py``) and its own
flags; ``to_dict`` / ``from_dict`` for ``args.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tunesmith.config.groups import (
    DataArgs,
    InferArgs,
    ModelArgs,
    TemplateArgs,
    TrainArgs,
    arg,
)


@dataclass
class DataCommandArgs(DataArgs, TemplateArgs, ModelArgs):
    """Everything ``tunesmith data`` takes."""

    packing: bool = arg(False, "also report how the samples would pack into --max_length")
    preview: int = arg(2, "rendered samples to show, trained tokens highlighted")
    color: str = arg("auto", "highlight with terminal colours", choices=("auto", "always", "never"))


@dataclass
class ExportArgs(TemplateArgs, ModelArgs):
    """Everything ``tunesmith export`` takes."""

    adapters: list[str] = arg([], "LoRA checkpoints to export (base model from args.json)")
    merge_lora: bool = arg(False, "merge the adapters into the base model")
    output_dir: str | None = arg(
        None,
        "where to write: a folder (merged model, Ollama folder, or the folder of the .gguf "
        "file) or a path ending in .gguf (default: beside the checkpoint or model, e.g. "
        "CHECKPOINT-merged/, CHECKPOINT-merged.gguf, CHECKPOINT-ollama/)",
    )
    to: str | None = arg(
        None,
        "export to llama.cpp's GGUF format (one file) or an Ollama folder (GGUF + Modelfile); "
        "with --adapters, the adapters are merged first (in memory)",
        choices=("gguf", "ollama"),
    )
    gguf_type: str = arg(
        "f16",
        "type of the GGUF weight matrices (norms and biases stay f32): f16 (llama.cpp's "
        "converter default, what llama-quantize takes), bf16 (exact for bf16 weights), q8_0 "
        "(8-bit, about half the size, near-lossless)",
        choices=("f16", "bf16", "q8_0"),
    )
    push_to_hub: bool = arg(False, "upload the result to the Hugging Face hub (--hub_model_id)")
    hub_model_id: str | None = arg(None, "hub repo to upload to, e.g. your-name/my-model")
    hub_private_repo: bool = arg(False, "create the hub repo as private")
    hub_token: str | None = arg(
        None, "Hugging Face token (default: HF_TOKEN or the `hf auth login` token)"
    )


@dataclass
class SftArgs(TrainArgs, DataArgs, TemplateArgs, ModelArgs):
    """Everything ``tunesmith sft`` takes."""


@dataclass
class InferCommandArgs(InferArgs, TemplateArgs, ModelArgs):
    """Everything ``tunesmith infer`` takes."""


def to_dict(args: object) -> dict[str, Any]:
    """All resolved fields of an args dataclass, as written to ``args.json``."""
    return dataclasses.asdict(args)  # type: ignore[call-overload]


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild ``cls`` from a dict, ignoring keys it does not have (e.g. an sft args.json)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class EvalArgs(TemplateArgs, ModelArgs):
    """Everything ``tunesmith eval`` takes."""

    adapters: list[str] = arg(
        [],
        "the tuned model: a LoRA checkpoint, or a run directory (its best checkpoint, else its "
        "last); base model, system prompt, name and author come from the run's args.json",
    )
    eval_dataset: list[str] = arg(
        ["identity", "retention"],
        "what to score: identity (held-out identity probes), retention (builtin general set), "
        "data files in any training format (the last assistant turn is the reference), "
        "general_qa:FILE (jsonl query/response), general_mcq:FILE (CSV id,question,A,B,C,D,"
        "answer)",
    )
    eval_limit: int | None = arg(None, "score only the first N items of each dataset")
    eval_output_dir: str | None = arg(
        None, "where the report goes (default: RUN/eval with --adapters, else eval_output/TIME)"
    )
    max_batch_size: int | None = arg(
        None, "answers generated together, left-padded; none: 16 (short answers pad little)"
    )
    max_new_tokens: int = arg(
        256, "answer length for your datasets (the builtin sets use shorter ones of their own)"
    )
    model_name: list[str] | None = arg(
        None, "the name identity answers must give (default: the run's --model_name)"
    )
    model_author: list[str] | None = arg(
        None, "the author identity answers may give instead (default: the run's --model_author)"
    )
    base_identity: list[str] = arg(
        ["Qwen", "通义千问", "通义", "千问", "Tongyi", "阿里云", "阿里巴巴", "阿里", "Alibaba"],
        "names an identity answer must not claim (the base model's own)",
    )
    metrics: list[str] = arg(
        ["bleu", "rouge", "exact_match"],
        "metrics of datasets with reference answers: bleu (BLEU-4), rouge (ROUGE-1/2/L), "
        "exact_match; multiple choice is scored by accuracy",
    )
    eval_use_cache: bool = arg(
        True, "reuse answers cached per model + item ($TUNESMITH_CACHE/eval); false: regenerate"
    )
    eval_speed: bool = arg(
        True, "measure time to first token and per-token decode time of each model"
    )
    infer_backend: str = arg(
        "auto",
        "engine that generates the answers: pt (PyTorch), llamacpp (a GGUF export of each "
        "model, made once and cached; several answers decoded together); auto = llamacpp on "
        "a CPU-only machine where it is installed, as for infer",
        choices=("auto", "pt", "llamacpp"),
    )
    gguf_type: str = arg(
        "f16", "llamacpp: type of the exported GGUF weights", choices=("f16", "bf16", "q8_0")
    )


@dataclass
class DeployArgs(ModelArgs):
    """Everything ``tunesmith deploy`` takes (ms-swift's ``swift deploy`` names first)."""

    adapters: list[str] = arg(
        [],
        "LoRA adapters to serve, each as name=CHECKPOINT (or a bare CHECKPOINT, served under "
        "its folder name); a request picks one by its 'model'; the base model comes from the "
        "first one's args.json unless --model is given",
    )
    served_model_name: str | None = arg(
        None, "the base model's name in /v1/models; none: --model, or its folder name"
    )
    host: str = arg("127.0.0.1", "address to listen on (loopback: only this machine)")
    port: int = arg(8000, "TCP port to listen on")
    api_key: str | None = arg(
        None,
        "require 'Authorization: Bearer KEY' on every /v1 route; none: the "
        "TUNESMITH_API_KEY environment variable if set, else no key",
    )
    infer_backend: str = arg(
        "pt",
        "inference engine: pt (dynamic batching in PyTorch), llamacpp (CPUs, pip install "
        "'tunesmith[llamacpp]'; one request at a time, each model a cached GGUF export); vllm "
        "is not implemented for deploy yet",
        choices=("pt", "vllm", "llamacpp"),
    )
    gguf_type: str = arg(
        "f16", "llamacpp: type of the weight matrices of the GGUF files it exports and caches",
        choices=("f16", "bf16", "q8_0"),
    )  # fmt: skip
    max_model_len: int | None = arg(
        None, "llamacpp: context size, prompt + answer (none: the model's, at most 8192)"
    )
    adapter_root: str | None = arg(
        None,
        "also serve any adapter folder inside this directory, named by its path relative to "
        "it (loaded on first request; nothing outside it is reachable)",
    )
    system: str | None = arg(
        None, "system prompt for requests without one; none: each adapter's training run's"
    )
    max_new_tokens: int = arg(512, "answer length when a request gives no max_tokens")
    max_tokens_limit: int = arg(4096, "largest max_tokens a request may ask for (400 above)")
    max_prompt_tokens: int = arg(8192, "longest prompt in tokens (400 above)")
    max_request_bytes: int = arg(1_048_576, "largest request body in bytes (413 above)")
    max_concurrent: int = arg(16, "requests decoded together in one batch")
    max_queue: int = arg(
        128, "requests waiting for a batch slot; more are refused with 429 and Retry-After"
    )
    request_timeout: float = arg(
        600.0, "seconds a request may take, waiting included, before it is stopped"
    )
