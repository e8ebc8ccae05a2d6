"""The flag groups several subcommands share: model, template, data, training, inference.

Every field's help text is its docstring: it is what ``tunesmith sft --help`` prints.
"""

from __future__ import annotations

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
    retain_kl: float = arg(
        0.0,
        "keep the model close to the base model on general data: on the answer tokens of the "
        "--retain_dataset records, add WEIGHT x KL(base || tuned), the divergence of the tuned "
        "model's next-token distributions from the base model's (the LoRA adapter switched off: "
        "one more forward, without gradient, of the batches holding such records); 0 = off",
    )
    retain_ce: float = arg(
        1.0,
        "weight of the usual cross-entropy on the --retain_dataset records' answers (1 = as any "
        "record); 0 with --retain_kl: match the base model's distributions only, not the text "
        "of its greedy answers",
    )
    retain_dataset: list[str] = arg(
        ["base-answers"],
        "the --dataset values that --retain_kl and --retain_ce apply to (as given there, "
        "without #N)",
    )
    fast: str = arg(
        "auto",
        "fast GPU path parts: auto (all on CUDA, none on CPU), all, none, or a comma list of "
        "lora,group,kernels,loss,graphs,embed",
    )
    cpu_fast: str = arg(
        "auto",
        "CPU training path parts: auto (lora,attn,adamw,pack,head when training on the CPU), "
        "all, none, or a comma list of lora,attn,adamw,pack,head,layers,compile",
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
