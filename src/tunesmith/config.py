"""Typed arguments for every subcommand, with ms-swift's flag names.

Each dataclass below is one group of flags; a subcommand's arguments are the union of a few
groups (``SftArgs`` = model + template + data + train). Every field's help text is its
docstring: it is what ``tunesmith sft --help`` prints. ``cli.py`` turns these dataclasses into
argparse parsers, merges ``--config run.yaml`` underneath the command line, and validates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def arg(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    todo: str | None = None,
) -> Any:
    """Declare one flag: its default, one-line help, allowed values and alternative names.

    ``todo`` marks a flag that is accepted (so ms-swift commands parse) but not implemented
    yet; giving it a non-default value is an error that says so, never a silent no-op.
    """
    meta = {"help": help, "choices": choices, "aliases": aliases, "todo": todo}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArgs:
    """Which model to load and how."""

    model: str | None = arg(
        None,
        "model to start from: a local HF model directory, a .gguf file, a hub id "
        "(e.g. Qwen/Qwen2.5-7B-Instruct), or the embedded 'demo' / 'demo-tiny' models; "
        "sft defaults to 'demo'",
    )
    model_type: str | None = arg(
        None, "model family (e.g. qwen2_5); read from the model's config.json when not given"
    )
    template: str | None = arg(
        None, "chat template name; by default the model tokenizer's own chat template is used"
    )
    torch_dtype: str = arg(
        "auto",
        "weights dtype; auto = bfloat16 on GPUs and CPUs with native bf16 matmul, else float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    use_hf: bool = arg(
        True, "download hub ids from the Hugging Face hub (false: ModelScope, if installed)"
    )
    attn_impl: str = arg(
        "sdpa", "attention implementation", choices=("sdpa", "eager", "flash_attention_2")
    )


@dataclass
class TemplateArgs:
    """How conversations become token ids."""

    system: str | None = arg(
        None,
        "default system prompt; a record's own system prompt wins over it, and it wins over "
        "the chat template's default",
    )
    max_length: int = arg(2048, "maximum tokens per sample (prompt + response)")
    truncation_strategy: str = arg(
        "delete",
        "what to do with samples longer than --max_length: delete them, or cut the left or "
        "right end",
        choices=("delete", "left", "right"),
    )
    loss_scale: str = arg(
        "default",
        "which assistant turns carry loss: default = every assistant turn, last_round = only "
        "the last one",
        choices=("default", "last_round"),
    )


@dataclass
class DataArgs:
    """Training data."""

    dataset: list[str] = arg(
        [],
        "datasets: local .json/.jsonl files (alpaca format), 'self-cognition' (builtin), "
        "'base-answers' (the base model's own answers to 40 general prompts, generated once), or "
        "hub ids; 'name#N' samples N records",
    )
    val_dataset: list[str] = arg([], "validation datasets (same forms as --dataset)")
    split_dataset_ratio: float = arg(
        0.0, "fraction of the training records held out for validation (without --val_dataset)"
    )
    dataset_probs: str | None = arg(
        None,
        "interleave the datasets with these probabilities, e.g. '0.4:0.4:0.2' (until the "
        "first runs out); without it they are concatenated",
    )
    columns: str | None = arg(
        None, 'rename columns before reading, e.g. \'{"question": "query", "answer": "response"}\''
    )
    dataset_format: str | None = arg(
        None,
        "record format, detected per record when not given",
        choices=("alpaca", "query_response", "messages", "sharegpt"),
    )
    strict: bool = arg(True, "a bad record stops the run (true) or is skipped and counted (false)")
    dataset_shuffle: bool = arg(True, "shuffle the training records every epoch")
    seed: int = arg(42, "random seed for sampling, mixing, data order, dropout and init")
    dataset_num_proc: int = arg(1, "processes used to tokenize the dataset")
    model_name: list[str] | None = arg(
        None,
        "the new model's name for the self-cognition data: one name, or a Chinese and an "
        "English one ('小智 XiaoZhi')",
    )
    model_author: list[str] | None = arg(
        None, "the new model's author for the self-cognition data: one, or Chinese and English"
    )
    packing: bool = arg(
        False,
        "pack several samples into one sequence of up to --max_length tokens (attention "
        "stays inside each sample)",
    )


@dataclass
class TrainArgs:
    """The training run."""

    train_type: str = arg(
        "lora",
        "what to train: lora (an adapter) or full (every weight; checkpoints are whole HF "
        "model directories)",
        choices=("lora", "full"),
        aliases=("tuner_type",),
    )
    output_dir: str = arg("output", "runs are written to OUTPUT_DIR/vN-YYYYMMDD-HHMMSS/")
    add_version: bool = arg(True, "write into a new vN-timestamp subdirectory of --output_dir")
    num_train_epochs: float = arg(3.0, "passes over the training data")
    max_steps: int = arg(-1, "stop after this many optimizer steps (-1: run all epochs)")
    per_device_train_batch_size: int = arg(1, "samples per micro-batch on each device")
    per_device_eval_batch_size: int = arg(1, "samples per evaluation batch on each device")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float = arg(1e-4, "peak learning rate")
    lr_scheduler_type: str = arg(
        "cosine", "learning rate schedule after warmup", choices=("cosine", "linear", "constant")
    )
    warmup_ratio: float = arg(0.0, "fraction of the steps spent warming up linearly")
    warmup_steps: int = arg(0, "warmup steps (overrides --warmup_ratio when > 0)")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.95, "AdamW beta2")
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this (0: no clipping)")
    logging_steps: int = arg(5, "log loss, lr, grad norm and speed every N steps")
    eval_steps: int | None = arg(None, "evaluate every N steps (needs validation data)")
    save_steps: int = arg(500, "save a checkpoint every N steps; the last step is always saved")
    save_total_limit: int | None = arg(
        None, "keep only the newest N checkpoints (the best one is always kept too)"
    )
    save_only_model: bool = arg(
        False, "checkpoints without optimizer/RNG state (smaller, but cannot be resumed exactly)"
    )
    metric_for_best_model: str = arg(
        "loss", "validation metric that picks the best checkpoint", choices=("loss", "token_acc")
    )
    load_best_model_at_end: bool = arg(
        False,
        "at the end, point the run at its best checkpoint (best_checkpoint.json), so "
        "`infer --adapters RUN_DIR` uses it",
    )
    early_stop_interval: int | None = arg(
        None, "stop after this many evaluations without improvement of the metric"
    )
    dataloader_num_workers: int = arg(0, "worker processes feeding the training loop")
    lora_rank: int = arg(8, "LoRA rank r")
    lora_alpha: int = arg(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    target_modules: list[str] = arg(
        ["all-linear"], "modules that get LoRA: all-linear, or module names (q_proj v_proj …)"
    )
    modules_to_save: list[str] = arg([], "modules trained in full beside the adapter")
    use_rslora: bool = arg(False, "rank-stabilised LoRA scaling (alpha / sqrt(r))")
    use_dora: bool = arg(False, "weight-decomposed LoRA (DoRA)")
    fast: str = arg(
        "auto",
        "fast GPU path parts: auto (all on CUDA, none on CPU), all, none, or a comma list of "
        "lora,group,kernels,loss,graphs,embed",
    )
    cpu_fast: str = arg(
        "auto",
        "CPU training path parts: auto (lora,attn,adamw,pack when training on the CPU), all, "
        "none, or a comma list of lora,attn,adamw,pack,compile",
    )
    gradient_checkpointing: bool | None = arg(
        None, "recompute activations in backward to save memory (default: on for GPU)"
    )
    report_to: list[str] = arg(["tensorboard"], "trackers: tensorboard, or none")
    resume_from_checkpoint: str | None = arg(
        None,
        "continue a run exactly from a checkpoint (PATH, or auto: the newest of the newest run "
        "in --output_dir), in the same run directory",
    )
    resume_only_model: bool = arg(
        False, "with --resume_from_checkpoint: load only its weights and start a new run"
    )
    quantization_bit: int = arg(
        0,
        "QLoRA: load the frozen base in 4 or 8 bits with bitsandbytes (CUDA only; 0 = off); "
        "the adapter trains as usual and checkpoints stay plain peft adapters",
        aliases=("quant_bits",),
    )
    bnb_4bit_quant_type: str = arg(
        "nf4", "4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4", choices=("nf4", "fp4")
    )
    bnb_4bit_use_double_quant: bool = arg(
        True, "also quantize the 4-bit scales (saves ~0.4 bits per weight)"
    )
    bnb_4bit_compute_dtype: str | None = arg(
        None,
        "dtype the 4-bit weights are dequantized to for each matmul (default: --torch_dtype)",
        choices=("bfloat16", "float16", "float32"),
    )
    lora_dtype: str = arg(
        "float32",
        "dtype of the trained LoRA weights and their optimizer state; bfloat16/float16 halve "
        "their memory at some precision cost",
        choices=("float32", "bfloat16", "float16"),
    )
    fsdp: str | None = arg(
        None,
        "shard weights, gradients and optimizer state over the processes with FSDP2: "
        "full_shard (or true), shard_grad_op (keep gathered weights until backward), plus "
        "offload (to CPU memory); default: DDP, a full copy in each process",
    )
    deepspeed: str | None = arg(
        None,
        "DeepSpeed ZeRO instead of DDP/FSDP: zero2, zero3, zero3_offload, or a DeepSpeed JSON "
        "config file (pip install 'tunesmith[deepspeed]')",
    )


@dataclass
class InferArgs:
    """Generation and the chat loop."""

    adapters: list[str] = arg(
        [],
        "LoRA checkpoints (output/vN-…/checkpoint-N); the base model, system prompt and "
        "template come from the run's args.json",
    )
    stream: bool = arg(True, "print tokens as they are generated")
    max_new_tokens: int = arg(512, "maximum tokens generated per answer")
    temperature: float | None = arg(
        None, "sampling temperature; 0 = greedy (default: the model's generation config)"
    )
    top_p: float | None = arg(None, "nucleus sampling probability mass")
    top_k: int | None = arg(None, "sample from the k most likely tokens")
    repetition_penalty: float | None = arg(None, "penalty for repeated tokens (1.0 = none)")
    seed: int = arg(42, "random seed for sampling")
    val_dataset: list[str] = arg(
        [],
        "batch inference: answer every record of these datasets (files in any training "
        "format; a final assistant reply is kept as the reference) and write --result_path",
    )
    result_path: str | None = arg(
        None,
        "batch inference: the JSON Lines file to write; none: CHECKPOINT/infer_result/"
        "TIMESTAMP.jsonl (./infer_result/ with --model)",
    )
    max_batch_size: int | None = arg(
        None,
        "batch inference: records generated together, left-padded; none: 16 on GPU, 8 on CPU "
        "(llamacpp: greedy answers decoded together; none: 16)",
    )
    fast_decode: bool | None = arg(
        None,
        "static KV cache, and on CUDA torch.compile of the decode step (the first answer "
        "compiles for a while); none: on for GPU, off on CPU, where it is not faster",
    )
    infer_backend: str = arg(
        "auto",
        "inference engine: pt (PyTorch/transformers, any device), vllm (CUDA GPUs, "
        "pip install 'tunesmith[vllm]'; the adapter is applied natively, batches continuously), "
        "llamacpp (CPUs, pip install 'tunesmith[llamacpp]'; runs a GGUF export, made once and "
        "cached); auto = llamacpp on a CPU-only machine where it is installed and the model "
        "and flags allow it, else pt",
        choices=("auto", "pt", "vllm", "llamacpp"),
    )
    gguf_type: str = arg(
        "f16",
        "llamacpp: type of the weight matrices of the GGUF file it exports and caches "
        "(f16 answers as pt does; q8_0 is faster, rarely different)",
        choices=("f16", "bf16", "q8_0"),
    )
    merge_lora: bool = arg(
        False, "merge the adapters into the base, save CHECKPOINT-merged/ and chat with it"
    )
    max_model_len: int | None = arg(
        None,
        "vLLM / llamacpp: longest prompt + answer in tokens (none: the model's context length; "
        "llamacpp: at most 8192)",
    )
    gpu_memory_utilization: float = arg(
        0.9, "vLLM: share of the GPU memory it may take for weights and KV cache"
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
