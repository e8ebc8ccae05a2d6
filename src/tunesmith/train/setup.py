"""What ``sft`` builds before its loop: the Accelerator, the data, the model, the optimizer.

Each step is one function of typed options, in the order ``sft`` calls them; the order
matters for reproducibility (the LoRA weights are initialised from the global RNG that
``seed_everything`` set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.config import SftArgs, to_dict
from tunesmith.data.collate import collate, pack
from tunesmith.data.prepare import Prepared, load_conversations, prepare
from tunesmith.model import quant
from tunesmith.model.cpu_fast import CpuFast, apply_cpu_fast
from tunesmith.model.fast import FastOptions, apply_fast_path
from tunesmith.model.load import (
    check_model_type,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from tunesmith.model.lora import CausalLMLoss, hf_model, keep_activation_dtype, lora_config
from tunesmith.model.lora_dropout import share_lora_dropout
from tunesmith.options import (
    DataOptions,
    LoraOptions,
    ModelOptions,
    QuantOptions,
    TemplateOptions,
    data_options,
    lora_options,
    optim_options,
    quant_options,
    template_options,
)
from tunesmith.train import distributed
from tunesmith.train.optim import Schedule, adamw, schedule
from tunesmith.train.retain import check_retain, retain_sources, retain_weights
from tunesmith.train.strategy import Strategy, accelerator_plugins
from tunesmith.train.track import JsonlLog, check_trackers, packing_report, truncate_log
from tunesmith.utils import UserError, logger, write_json

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Accelerate's name of the mixed-precision mode computing in each dtype.
MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def validate(args: SftArgs) -> None:
    """Refuse flags that cannot train, before anything is loaded or written."""
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "max_length"]
    positive += ["logging_steps", "save_steps", "lora_rank"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise UserError("--num_train_epochs must be positive (or give --max_steps)")
    if not 0 <= args.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    quant.check_quantization(quant_options(args), args.train_type == "full")
    FastOptions.parse(args.fast)  # a bad --fast part is refused here, not after loading
    CpuFast.parse(args.cpu_fast)
    check_retain(args)
    if args.eval_steps and not (args.val_dataset or args.split_dataset_ratio):
        logger.info(
            "note: --eval_steps is set but there is no validation data; nothing to evaluate"
        )


def make_accelerator(
    dtype: torch.dtype, run_dir: Path, trackers: list[str], strategy: Strategy, args: SftArgs
) -> Accelerator:
    """An Accelerator computing in ``dtype`` under autocast, logging to ``trackers``, sharing
    the work of several processes as ``strategy`` says (DDP, FSDP2, DeepSpeed).

    Autocast runs the fp32 LoRA weights in the base's dtype: no fp32 copies of the
    activations, and one mixed-precision path on CPU and GPU alike.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, is_initialized
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    mixed = MIXED_PRECISION.get(dtype, "no")
    if is_initialized() and AcceleratorState().mixed_precision != mixed:
        # Accelerate keeps one precision per process and refuses another; an earlier run in
        # this process (a notebook, the tests) may have used a different one. Nothing else
        # of its state carries over between runs, so it is cleared only in this case.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    plugins = accelerator_plugins(
        strategy, mixed, args.gradient_accumulation_steps, args.max_grad_norm
    )
    accelerator = Accelerator(
        mixed_precision=mixed,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Accelerate finds CPU worker processes (gloo) only when asked for the CPU.
        cpu=not torch.cuda.is_available(),
        **plugins,
    )
    distributed.fsdp_on_cpu(accelerator, plugins)
    return accelerator


def load_data(
    data: DataOptions, template: TemplateOptions, model: ModelOptions, progress: bool
) -> tuple[Path, PreTrainedTokenizerBase, Prepared]:
    """(model directory, tokenizer, tokenized data); every record is checked before the model
    is even resolved, so a bad file fails in seconds."""
    conversations = load_conversations(data)
    assert model.model is not None  # sft() always names one ('demo' by default)
    model_dir = resolve_model(model.model, model.use_hf)
    check_model_type(model_dir, model.model_type, model.template)
    tokenizer = load_tokenizer(model_dir)
    prepared = prepare(data, template, tokenizer, progress=progress, loaded=conversations)
    samples = prepared.train
    n_tokens = sum(len(s.input_ids) for s in samples)
    n_trained = sum(s.n_trained for s in samples)
    logger.info(
        f"{len(samples)} samples, {n_tokens} tokens ({n_trained} trained)"
        + (f", {len(prepared.val)} validation samples" if prepared.val else "")
    )
    return model_dir, tokenizer, prepared


def train_items(samples: list[Any], max_length: int, packing: bool, batch_size: int) -> list[Any]:
    """What the data loader yields: the samples, or packs of them with ``--packing``."""
    if not packing:
        return samples
    packs = pack(samples, max_length)
    logger.info(packing_report(samples, packs, batch_size, max_length))
    return packs


@dataclass(frozen=True)
class ModelPlan:
    """How ``build_model`` loads and wraps the model."""

    weights_dir: Path
    """Where the weights come from: the base, or a full fine-tuning checkpoint."""
    dtype: torch.dtype
    """The compute dtype."""
    full: bool
    """--train_type full (else a LoRA adapter)."""
    lora: LoraOptions
    """The adapter, for LoRA."""
    quant: QuantOptions
    """QLoRA's quantization of the base."""
    attn_impl: str
    """--attn_impl."""
    gradient_checkpointing: bool | None
    """--gradient_checkpointing (None: on for GPU)."""
    fast: FastOptions
    """--fast: which parts of the fast GPU path to switch on."""
    cpu_fast: CpuFast = field(default_factory=CpuFast)
    """--cpu_fast: which parts of the CPU training path to switch on."""


def build_model(
    plan: ModelPlan, device: torch.device, resume: Path | None
) -> tuple[PreTrainedModel, str]:
    """The model to train and a phrase saying what is trained.

    LoRA: the base in the compute dtype (QLoRA: its linear layers in 4/8 bits), adapter
    weights and optimizer state in ``--lora_dtype`` (fp32). Full: fp32 master weights,
    computed in the compute dtype under autocast.
    """
    from peft import get_peft_model

    bnb = quant.bnb_config_from(plan.quant, plan.dtype)
    # At a few dozen tokens a step the CPU's SDPA kernel is slower than eager attention.
    attn_impl = "eager" if plan.cpu_fast.attn and plan.attn_impl == "sdpa" else plan.attn_impl
    model = load_model(
        plan.weights_dir,
        torch.float32 if plan.full else plan.dtype,
        attn_impl,
        device=device if bnb else None,  # bitsandbytes quantizes on the GPU
        quantization_config=bnb,
    )
    model.config.use_cache = False
    grad_ckpt = plan.gradient_checkpointing
    if grad_ckpt is None:
        grad_ckpt = device.type == "cuda"
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not plan.full:
        model = get_peft_model(model, lora_config(plan.lora))
        quant.set_lora_dtype(model, plan.lora.dtype)
        share_lora_dropout(model)  # one mask per input, a quarter of the RNG calls
        if resume is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(resume / "adapter_model.safetensors"))
        if plan.dtype != torch.float32:  # under autocast; without it peft's input cast is needed
            keep_activation_dtype(model)
    # After the shared dropout masks: the fused LoRA layers draw their own graph-safe masks,
    # one per input as the shared dropout does (fast: auto = none on CPU, so the measured CPU
    # choices stay as they were).
    for line in apply_fast_path(model, plan.fast):
        logger.info(f"fast path: {line}")
    for line in apply_cpu_fast(model, plan.cpu_fast, attn_impl):
        logger.info(f"CPU path: {line}")
    if resume is not None:
        logger.info(f"loaded the weights of {resume}")
    what = "full fine-tuning" if plan.full else f"LoRA r={plan.lora.rank}"
    if bnb is not None:
        what = f"QLoRA ({plan.quant.bits}-bit base) r={plan.lora.rank}"
    return model, what


def loaders(
    args: SftArgs, items: list[Any], val: list[Any], pad_id: int
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The training and validation data loaders."""
    sources = retain_sources(args)  # the batches mark their tokens for --retain_kl
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=args.per_device_train_batch_size,
        shuffle=args.dataset_shuffle,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda b: collate(b, pad_id, sources),
        num_workers=args.dataloader_num_workers,
        # Workers live across epochs: re-forking a process that holds the model costs ~1 s.
        persistent_workers=args.dataloader_num_workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(
        val, batch_size=args.per_device_eval_batch_size, collate_fn=lambda b: collate(b, pad_id)
    )
    return loader, val_loader


@dataclass
class Run:
    """Everything the loop works with, prepared by Accelerate."""

    args: SftArgs
    """The run's flags (read, never changed)."""
    accelerator: Accelerator
    """The Accelerator (devices, processes, mixed precision, trackers)."""
    loss_module: torch.nn.Module
    """The model inside its loss (``CausalLMLoss``), prepared."""
    params: list[torch.nn.Parameter]
    """The trained parameters (gradient clipping)."""
    optimizer: torch.optim.Optimizer
    """AdamW, prepared."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """The learning-rate schedule."""
    loader: Any
    """Training micro-batches, prepared (an Accelerate ``DataLoaderShard``)."""
    val_loader: Any
    """Validation batches, prepared (empty without validation data)."""
    has_val: bool
    """Whether there is validation data to evaluate."""
    tokenizer: PreTrainedTokenizerBase
    """Saved into every checkpoint."""
    run_dir: Path
    """Where logs and checkpoints go."""
    resolved: dict[str, Any]
    """Every resolved argument (``args.json``)."""
    sched: Schedule
    """Step counts."""
    strategy: Strategy
    """How the processes share the model (DDP, FSDP2, DeepSpeed)."""
    trackers: list[str] = field(default_factory=list)
    """--report_to trackers in use."""
    resume: Path | None = None
    """The checkpoint an exact resume continues from."""
    log: JsonlLog | None = None
    """``logging.jsonl`` (main process only)."""


def setup(
    args: SftArgs,
    model_opts: ModelOptions,
    run_dir: Path,
    resume: Path | None,
    strategy: Strategy,
    progress: bool = True,
) -> Run:
    """Data, model, optimizer, schedule and loaders, prepared by a fresh Accelerator
    (``progress``: show the tokenization bar on the main process)."""
    from accelerate import PartialState

    trackers = check_trackers(args.report_to)
    dtype = resolve_dtype(model_opts.torch_dtype, PartialState().device.type)
    full = args.train_type == "full"
    quant.check_lora_dtype(args.lora_dtype, dtype, full)
    accelerator = make_accelerator(dtype, run_dir, trackers, strategy, args)
    template = template_options(args)
    data_opts = data_options(args, use_hf=model_opts.use_hf)
    # One process per machine converts the model and tokenizes (both cached on disk); the
    # others then read the cache instead of writing it too.
    with accelerator.local_main_process_first():
        model_dir, tokenizer, data = load_data(
            data_opts, template, model_opts, progress and accelerator.is_main_process
        )
    items = train_items(
        data.train, template.max_length, args.packing, args.per_device_train_batch_size
    )
    plan = ModelPlan(
        weights_dir=resume if (full and resume is not None) else model_dir,
        dtype=dtype,
        full=full,
        lora=lora_options(args),
        quant=quant_options(args),
        attn_impl=model_opts.attn_impl,
        gradient_checkpointing=args.gradient_checkpointing,
        fast=FastOptions.parse(args.fast, cuda=accelerator.device.type == "cuda"),
        cpu_fast=CpuFast.parse(args.cpu_fast, cpu=accelerator.device.type == "cpu"),
    )
    model, what = build_model(plan, accelerator.device, resume)
    trainable, total = quant.param_counts(model)
    logger.info(
        f"model {model_opts.model} ({total / 1e6:.0f}M params, "
        f"{str(dtype).removeprefix('torch.')}), "
        f"{what}: {trainable / 1e6:.2f}M trainable ({100 * trainable / total:.2f}%)"
    )
    # Optimizer, schedule, data loaders; Accelerate places and (if distributed) shards them.
    optim = optim_options(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, optim, fused=accelerator.device.type == "cuda" or plan.cpu_fast.adamw)
    loader, val_loader = loaders(args, items, data.val, tokenizer.pad_token_id)
    distributed.set_layers_to_shard(accelerator, hf_model(model))
    loss = CausalLMLoss(model, fused_ce=plan.fast.loss, retain=retain_weights(args))
    loss_module, optimizer, loader, val_loader = accelerator.prepare(
        loss, optimizer, loader, val_loader
    )
    if plan.fast.embed and accelerator.device.type == "cuda" and not strategy.sharded:
        from tunesmith.model.fast.embed import offload_embedding

        if line := offload_embedding(model):
            logger.info(f"fast path: {line}")
    # FSDP2 replaced the parameters with sharded ones: clip those.
    params = [p for p in loss_module.parameters() if p.requires_grad]
    sched, scheduler = schedule(args, optim, len(loader), optimizer)
    resolved = to_dict(args) | {
        "model": model_opts.model,
        "model_dir": str(model_dir),
        "run_dir": str(run_dir),
    }
    return Run(args, accelerator, loss_module, params, optimizer, scheduler, loader, val_loader,
               bool(data.val), tokenizer, run_dir, resolved, sched, strategy,
               trackers)  # fmt: skip


def open_run_dir(run: Run, exact_resume: bool, step: int) -> None:
    """Create the run directory (only now that data and model are known to be good), write
    ``args.json``, open the log and the trackers."""
    if run.accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.run_dir / "args.json", run.resolved)
        if exact_resume:
            truncate_log(run.run_dir / "logging.jsonl", step)
        run.log = JsonlLog(run.run_dir / "logging.jsonl")
    if run.trackers:
        run.accelerator.init_trackers("runs", config=scalar_config(run.resolved))
    args = run.args
    logger.info(
        f"training: {run.sched.total_steps} steps ({run.sched.steps_per_epoch}/epoch, batch "
        f"{args.per_device_train_batch_size}x{args.gradient_accumulation_steps}x"
        f"{run.accelerator.num_processes}), output {run.run_dir}"
        + distributed.describe(run.accelerator)
    )


def scalar_config(d: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's hparams accept scalars only."""
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in d.items()}
