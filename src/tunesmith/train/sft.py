"""The SFT recipe, top to bottom: data -> model -> Accelerate -> loop -> log -> save."""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import SftArgs, to_dict
from tunesmith.data.collate import collate, pack
from tunesmith.data.prepare import load_conversations, prepare
from tunesmith.model import quant
from tunesmith.model.fast import FastOptions, apply_fast_path
from tunesmith.model.load import (
    check_model_type,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from tunesmith.model.lora import CausalLMLoss, keep_activation_dtype, lora_config
from tunesmith.train.checkpoint import (
    find_resume_checkpoint,
    load_training_state,
    new_run_dir,
    restore_rng,
    rotate,
    save_checkpoint,
)
from tunesmith.train.optim import adamw, lr_lambda
from tunesmith.train.stop import StopRequest
from tunesmith.train.track import (
    BestTracker,
    JsonlLog,
    check_trackers,
    evaluate,
    log_record,
    packing_report,
    plot_curves,
    truncate_log,
)
from tunesmith.utils import Interrupted, UserError, logger, seed_everything, write_json


def sft(args: SftArgs) -> Path:
    """Fine-tune ``args.model`` on ``args.dataset``; returns the run directory."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from peft import get_peft_model
    from tqdm.auto import tqdm

    if args.model is None:
        args.model = "demo"
    _validate(args)
    fast = FastOptions.parse(args.fast)
    seed_everything(args.seed)
    resume = None
    if args.resume_from_checkpoint:
        resume = find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
    # An exact resume continues in its own run directory: one log, one TensorBoard run.
    exact_resume = resume is not None and not args.resume_only_model
    run_dir = (
        resume.parent if exact_resume else new_run_dir(Path(args.output_dir), args.add_version)
    )
    report_to = check_trackers(args.report_to)
    # Accelerate keeps its settings process-wide; a second sft() in one process (tests, a
    # notebook) may ask for another precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    dtype = resolve_dtype(args.torch_dtype, PartialState().device.type)
    quant.check_lora_dtype(args.lora_dtype, dtype, args.train_type == "full")
    accelerator = Accelerator(
        # Autocast runs the fp32 LoRA weights in the base's dtype: no fp32 copies of the
        # activations, and one mixed-precision path on CPU and GPU alike.
        mixed_precision={"bfloat16": "bf16", "float16": "fp16"}.get(str(dtype)[6:], "no"),
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process

    # 1. Data: records -> conversations -> token ids + labels; every record is checked before
    # the model is even resolved, so a bad file fails in seconds.
    conversations = load_conversations(args)
    model_dir = resolve_model(args.model, args.use_hf)
    check_model_type(model_dir, args.model_type, args.template)
    tokenizer = load_tokenizer(model_dir)
    data = prepare(args, tokenizer, progress=main, loaded=conversations)
    samples = data.train
    items: list[Any] = pack(samples, args.max_length) if args.packing else samples
    if args.packing:
        logger.info(
            packing_report(samples, items, args.per_device_train_batch_size, args.max_length)
        )
    n_tokens = sum(len(s.input_ids) for s in samples)
    n_trained = sum(s.n_trained for s in samples)
    logger.info(
        f"{len(samples)} samples, {n_tokens} tokens ({n_trained} trained)"
        + (f", {len(data.val)} validation samples" if data.val else "")
    )

    # 2. Model. LoRA: the base in the compute dtype (QLoRA: its linear layers in 4/8 bits),
    # adapter weights and optimizer state in --lora_dtype (fp32). Full: fp32 master weights,
    # computed in the compute dtype under autocast.
    full = args.train_type == "full"
    weights_dir = resume if (full and resume is not None) else model_dir
    bnb = quant.bnb_config_from(to_dict(args), dtype)
    model = load_model(
        weights_dir,
        torch.float32 if full else dtype,
        args.attn_impl,
        device=accelerator.device if bnb else None,  # bitsandbytes quantizes on the GPU
        quantization_config=bnb,
    )
    model.config.use_cache = False
    grad_ckpt = args.gradient_checkpointing
    if grad_ckpt is None:
        grad_ckpt = accelerator.device.type == "cuda"
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not full:
        model = get_peft_model(model, lora_config(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=args.target_modules,
            modules_to_save=args.modules_to_save,
            use_rslora=args.use_rslora,
            use_dora=args.use_dora,
        ))  # fmt: skip
        quant.set_lora_dtype(model, args.lora_dtype)
        if resume is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(resume / "adapter_model.safetensors"))
        if dtype != torch.float32:  # under autocast; without it peft's input cast is needed
            keep_activation_dtype(model)
    for line in apply_fast_path(model, fast):
        logger.info(f"fast path: {line}")
    if resume is not None:
        logger.info(f"loaded the weights of {resume}")
    trainable, total = quant.param_counts(model)
    what = "full fine-tuning" if full else f"LoRA r={args.lora_rank}"
    if bnb is not None:
        what = f"QLoRA ({args.quantization_bit}-bit base) r={args.lora_rank}"
    logger.info(
        f"model {args.model} ({total / 1e6:.0f}M params, {str(dtype).removeprefix('torch.')}), "
        f"{what}: {trainable / 1e6:.2f}M trainable ({100 * trainable / total:.2f}%)"
    )

    # 3. Optimizer, schedule, data loader; Accelerate places and (if distributed) shards them.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, args, fused=accelerator.device.type == "cuda")
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=args.per_device_train_batch_size,
        shuffle=args.dataset_shuffle,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
        num_workers=args.dataloader_num_workers,
        # Workers live across epochs: re-forking a process that holds the model costs ~1 s.
        persistent_workers=args.dataloader_num_workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(
        data.val,
        batch_size=args.per_device_eval_batch_size,
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
    )
    loss_module = CausalLMLoss(model, fused_ce=fast.loss)
    loss_module, optimizer, loader, val_loader = accelerator.prepare(
        loss_module, optimizer, loader, val_loader
    )
    ga = args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(loader) / ga))
    total_steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_scheduler_type, warmup, total_steps)
    )

    step, epoch, skip = 0, 0, 0
    if exact_resume:
        position = load_training_state(resume, optimizer, scheduler)
        step, epoch, skip = position["global_step"], position["epoch_index"], position["micro"]
        logger.info(f"resuming at step {step} (epoch {epoch}, micro-batch {skip}) from {resume}")

    # 4. The run directory appears only now that data and model are known to be good.
    resolved = to_dict(args) | {"model_dir": str(model_dir), "run_dir": str(run_dir)}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "args.json", resolved)
        if exact_resume:
            truncate_log(run_dir / "logging.jsonl", step)
        log = JsonlLog(run_dir / "logging.jsonl")
    if report_to:
        accelerator.init_trackers("runs", config=_scalar_config(resolved))
    logger.info(
        f"training: {total_steps} steps ({steps_per_epoch}/epoch, batch "
        f"{args.per_device_train_batch_size}x{ga}x{accelerator.num_processes}), output {run_dir}"
    )

    # 5. The loop. Each optimizer step takes `ga` micro-batches; the loss is normalised by the
    # trained tokens of the whole step (all micro-batches, all processes), so accumulation
    # gives the same gradient as one large batch.
    model.train()
    if torch.cuda.is_available():  # the logged memory_gb is then the training peak
        torch.cuda.reset_peak_memory_stats()
    seen_tokens, t0, first_step = 0, time.perf_counter(), step
    window: dict[str, float] = {"loss": 0.0, "tokens": 0, "trained": 0, "correct": 0, "t": t0}
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    last_ckpt = None
    best = BestTracker(args.metric_for_best_model, args.early_stop_interval)
    stop = StopRequest.install()
    try:
        while step < total_steps:
            loader.set_epoch(epoch)
            batches = iter(loader)
            consumed = 0
            if skip:
                for _ in range(skip):
                    next(batches, None)
                consumed, skip = skip, 0
                # Starting the data iterator may draw from the global RNG; restore the saved
                # states after it so dropout masks match the uninterrupted run.
                restore_rng(resume)
            while step < total_steps:
                micro = [b for _, b in zip(range(ga), batches, strict=False)]
                if not micro:
                    break
                consumed += len(micro)
                n_step = torch.tensor(
                    sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                    device=accelerator.device,
                )
                n_step = accelerator.reduce(n_step, reduction="sum").clamp(min=1)
                step_loss = torch.zeros((), device=accelerator.device)
                for i, batch in enumerate(micro):
                    ctx = accelerator.no_sync(loss_module) if i < len(micro) - 1 else nullcontext()
                    with ctx:
                        loss_sum, n, correct = loss_module(**batch)
                        # DDP averages gradients over processes: scale by their number to get a
                        # sum over all tokens, divided by the global token count.
                        accelerator.backward(loss_sum * accelerator.num_processes / n_step)
                    step_loss += loss_sum.detach()
                    window["correct"] += float(correct)
                    window["tokens"] += batch["input_ids"].numel()
                    seen_tokens += batch["input_ids"].numel()
                    window["trained"] += int(n)
                grad_norm = None
                if args.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, args.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_val = float(accelerator.reduce(step_loss, reduction="sum") / n_step)
                if not math.isfinite(loss_val):
                    raise UserError(
                        f"the loss became {loss_val} at step {step}; lower --learning_rate or "
                        f"check the data (last good checkpoint: {last_ckpt or 'none'})"
                    )
                window["loss"] += loss_val
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if step % args.logging_steps == 0 or step == total_steps:
                    record = log_record(
                        window,
                        step,
                        steps_per_epoch,
                        total_steps,
                        t0,
                        scheduler.get_last_lr()[0],
                        grad_norm,
                        args.logging_steps,
                        first_step,
                    )
                    if main:
                        log.write(record)
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    window = {
                        "loss": 0.0,
                        "tokens": 0,
                        "trained": 0,
                        "correct": 0,
                        "t": time.perf_counter(),
                    }
                if data.val and (
                    step == total_steps or (args.eval_steps and step % args.eval_steps == 0)
                ):
                    record = {"step": step, **evaluate(loss_module, val_loader, accelerator)}
                    mark = " (best)" if best.update(record, step) else ""
                    if main:
                        log.write(record)
                        bar.write(
                            f"step {step}: eval_loss {record['eval_loss']:.4f}, "
                            f"eval_token_acc {record['eval_token_acc']:.3f}{mark}"
                        )
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    if best.should_stop and step < total_steps:
                        logger.info(
                            f"early stop at step {step}: {best.bad_evals} evaluations without a "
                            f"better {best.key} (best {best.best} at step {best.best_step})"
                        )
                        total_steps = step  # saves this step, then leaves the loop
                # Every process stops at the same step, whichever of them got the signal.
                flag = torch.tensor(int(stop.requested is not None), device=accelerator.device)
                stopping = bool(accelerator.reduce(flag, reduction="sum"))
                if step % args.save_steps == 0 or step == total_steps or stopping:
                    accelerator.wait_for_everyone()
                    if main:
                        state = {
                            "global_step": step,
                            "max_steps": total_steps,
                            "epoch": step / steps_per_epoch,
                            "epoch_index": epoch,
                            "micro": consumed,
                        }
                        last_ckpt = save_checkpoint(
                            run_dir,
                            step,
                            model=accelerator.unwrap_model(loss_module).model,
                            tokenizer=tokenizer,
                            args=resolved,
                            trainer_state=state,
                            optimizer=None if args.save_only_model else optimizer,
                            scheduler=scheduler,
                        )
                        if best.best_step == step:
                            best.checkpoint = last_ckpt
                        rotate(run_dir, args.save_total_limit, keep={last_ckpt, best.checkpoint})
                if stopping:
                    accelerator.end_training()
                    raise Interrupted(
                        f"{stop.requested or 'a stop signal'} received: saved {last_ckpt} after "
                        f"step {step}; continue with the same command plus "
                        "--resume_from_checkpoint auto"
                    )
            epoch += 1
    finally:
        stop.restore()
    bar.close()
    train_s = time.perf_counter() - t0
    accelerator.end_training()
    if main:
        log.close()
        plot_curves(run_dir / "logging.jsonl", run_dir / "images")
        logger.info(
            f"trained {step - first_step} steps in {train_s:.1f}s "
            f"({seen_tokens / train_s:.0f} tokens/s per process); last checkpoint: {last_ckpt}"
        )
        if best.best is not None:
            logger.info(
                f"best {best.key} {best.best} at step {best.best_step}: "
                f"{best.checkpoint or 'not saved (no checkpoint at that step)'}"
            )
        if args.load_best_model_at_end and best.checkpoint is not None:
            # `tunesmith infer --adapters RUN_DIR` then loads the best checkpoint.
            write_json(run_dir / "best_checkpoint.json", best.state())
    return run_dir


def _scalar_config(d: dict) -> dict:
    """TensorBoard's hparams accept scalars only."""
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in d.items()}


def _validate(args: SftArgs) -> None:
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
    quant.check_quantization(args)
    if args.eval_steps and not (args.val_dataset or args.split_dataset_ratio):
        logger.info(
            "note: --eval_steps is set but there is no validation data; nothing to evaluate"
        )
