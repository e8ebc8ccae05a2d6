"""The SFT recipe, top to bottom: data -> model -> Accelerate -> loop -> log -> save.

``sft`` sets up (``train/setup.py`` builds each part), ``train_loop`` runs the optimizer
steps, and the named helpers beside it log, evaluate, stop early, check for a stop signal
and save checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import SftArgs
from tunesmith.options import model_options
from tunesmith.train import distributed
from tunesmith.train.checkpoint import (
    Gathered,
    find_resume_checkpoint,
    load_training_state,
    new_run_dir,
    restore_rng,
    rotate,
    save_checkpoint,
)
from tunesmith.train.setup import Run, open_run_dir, setup, validate
from tunesmith.train.stop import StopRequest
from tunesmith.train.strategy import check_resume, parse_strategy
from tunesmith.train.track import BestTracker, evaluate, log_record, plot_curves
from tunesmith.utils import Interrupted, UserError, logger, seed_everything, write_json


@dataclass
class Position:
    """Where the loop is, and what it has accumulated since the last log line."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Index of the current pass over the data."""
    skip: int = 0
    """Micro-batches of this epoch to skip (an exact resume mid-epoch)."""
    consumed: int = 0
    """Micro-batches of this epoch consumed so far."""
    first_step: int = 0
    """The step this process started at."""
    seen_tokens: int = 0
    """Tokens (with padding) seen by this process."""
    t0: float = field(default_factory=time.perf_counter)
    """When the loop started."""
    window: dict[str, float] = field(default_factory=dict)
    """Counters since the last log line (see ``new_window``)."""
    last_ckpt: Path | None = None
    """The newest checkpoint saved."""


def sft(args: SftArgs, progress: bool = True) -> Path:
    """Fine-tune ``args.model`` (default: ``demo``) on ``args.dataset``; returns the run
    directory. ``args`` is only read; ``progress=False`` hides the progress bars."""
    validate(args)
    strategy = parse_strategy(args.fsdp, args.deepspeed, args.quantization_bit)
    check_resume(strategy, args.resume_from_checkpoint, args.resume_only_model)
    seed_everything(args.seed)
    model = model_options(args, default_model="demo")
    state = distributed.init_state()
    distributed.quiet_other_ranks(state.is_main_process)
    resume = None
    if args.resume_from_checkpoint:
        resume = find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
    # An exact resume continues in its own run directory: one log, one TensorBoard run.
    exact_resume = resume is not None and not args.resume_only_model
    run_dir = distributed.agree(  # named from the clock: rank 0's name for every process
        resume.parent if exact_resume else new_run_dir(Path(args.output_dir), args.add_version)
    )
    run = setup(args, model, run_dir, resume, strategy, progress)
    pos = Position()
    if exact_resume:
        assert resume is not None
        acc = run.accelerator
        saved = load_training_state(
            resume, run.optimizer, run.scheduler, sharded_optimizer_loader(run),
            acc.process_index, acc.num_processes,
        )  # fmt: skip
        pos.step, pos.epoch = saved["global_step"], saved["epoch_index"]
        pos.skip = distributed.micro_batches_to_skip(saved, acc.num_processes)
        logger.info(
            f"resuming at step {pos.step} (epoch {pos.epoch}, micro-batch {pos.skip}) from {resume}"
        )
        run.resume = resume
    open_run_dir(run, exact_resume, pos.step)
    best = BestTracker(args.metric_for_best_model, args.early_stop_interval)
    train_loop(run, pos, best, progress)
    finish(run, pos, best)
    return run_dir


def train_loop(run: Run, pos: Position, best: BestTracker, progress: bool = True) -> None:
    """Optimizer steps until the last one, an early stop, or a stop signal (which saves and
    raises ``Interrupted``)."""
    total = run.sched.total_steps
    run.loss_module.train()
    if torch.cuda.is_available():  # the logged memory_gb is then the training peak
        torch.cuda.reset_peak_memory_stats()
    pos.first_step, pos.t0 = pos.step, time.perf_counter()
    pos.window = new_window(pos.t0)
    bar = progress_bar(pos.step, total, progress and run.accelerator.is_main_process)
    stop = StopRequest.install()
    try:
        while pos.step < total:
            batches = epoch_batches(run, pos)
            while pos.step < total:
                micro = [b for _, b in zip(range(run.args.gradient_accumulation_steps), batches,
                                            strict=False)]  # fmt: skip
                if not micro:
                    break
                pos.consumed += len(micro)
                loss, grad_norm = train_step(run, pos, micro)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
                if pos.step % run.args.logging_steps == 0 or pos.step == total:
                    log_step(run, pos, grad_norm)
                evaluated = evaluate_step(run, pos.step, best, bar)
                early = evaluated and stop_early(best, pos.step, total)
                stopping = stop_signalled(run.accelerator, stop)
                if pos.step % run.args.save_steps == 0 or pos.step == total or early or stopping:
                    save_step(run, pos, best, end=pos.step if early else total)
                if stopping:
                    distributed.finish(run.accelerator)
                    raise Interrupted(
                        f"{stop.requested or 'a stop signal'} received: saved {pos.last_ckpt} "
                        f"after step {pos.step}; continue with the same command plus "
                        "--resume_from_checkpoint auto"
                    )
                if early:
                    return
            pos.epoch += 1
    finally:
        stop.restore()
        bar.close()


def epoch_batches(run: Run, pos: Position) -> Any:
    """An iterator over this epoch's micro-batches, past those an exact resume already did."""
    run.loader.set_epoch(pos.epoch)
    batches = iter(run.loader)
    pos.consumed = 0
    if pos.skip:
        for _ in range(pos.skip):
            next(batches, None)
        pos.consumed, pos.skip = pos.skip, 0
        # Starting the data iterator may draw from the global RNG; restore the saved states
        # after it so dropout masks match the uninterrupted run.
        assert run.resume is not None
        restore_rng(run.resume, run.accelerator.process_index, run.accelerator.num_processes)
    return batches


def train_step(run: Run, pos: Position, micro: list[dict[str, Any]]) -> tuple[float, float | None]:
    """One optimizer step over ``micro``: (loss per trained token, gradient norm).

    The loss is normalised by the trained tokens of the whole step (all micro-batches, all
    processes), so accumulation gives the same gradient as one large batch.
    """
    acc, window = run.accelerator, pos.window
    n_step = torch.tensor(
        sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), device=acc.device
    )
    n_step = acc.reduce(n_step, reduction="sum").clamp(min=1)
    step_loss = torch.zeros((), device=acc.device)
    scale = distributed.loss_scale(acc, run.args.gradient_accumulation_steps)
    for i, batch in enumerate(micro):
        with distributed.micro_step(acc, run.loss_module, i == len(micro) - 1):
            loss_sum, n, correct = run.loss_module(**batch)
            # DDP averages gradients over processes: scale by their number to get a sum over
            # all tokens, divided by the global token count.
            acc.backward(loss_sum * scale / n_step)
        if "retain" in batch:  # --retain_kl: the KL to the base model, logged per token
            kl, n_kl = acc.unwrap_model(run.loss_module).retain_stats
            window["retain_kl"] += kl
            window["retain_tokens"] += n_kl
        step_loss += loss_sum.detach()
        window["correct"] += float(correct)
        window["tokens"] += batch["input_ids"].numel()
        pos.seen_tokens += batch["input_ids"].numel()
        window["trained"] += int(n)
    grad_norm = None
    if run.args.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(run.params, run.args.max_grad_norm)
        grad_norm = None if norm is None else float(norm)  # DeepSpeed: none before its step
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    pos.step += 1
    loss = float(acc.reduce(step_loss, reduction="sum") / n_step)
    if not math.isfinite(loss):
        raise UserError(
            f"the loss became {loss} at step {pos.step}; lower --learning_rate or check the "
            f"data (last good checkpoint: {pos.last_ckpt or 'none'})"
        )
    window["loss"] += loss
    return loss, grad_norm


def new_window(t: float) -> dict[str, float]:
    """Empty counters for the log line after time ``t``."""
    return {"loss": 0.0, "tokens": 0, "trained": 0, "correct": 0, "t": t, "retain_kl": 0.0,
            "retain_tokens": 0}  # fmt: skip


def progress_bar(step: int, total: int, main: bool) -> Any:
    """The tqdm bar of the main process (a terminal redraws often, a log file seldom)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", disable=not main,
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)  # fmt: skip


def log_step(run: Run, pos: Position, grad_norm: float | None) -> None:
    """Write one ``logging.jsonl`` line and tracker point; start a new window. Counts are
    summed over the processes, memory is the busiest process's."""
    keys = ("tokens", "trained", "correct", "retain_kl", "retain_tokens")
    distributed.sum_counts(run.accelerator, pos.window, keys)
    record = log_record(pos.window, pos.step, run.sched.steps_per_epoch, run.sched.total_steps,
                        pos.t0, run.scheduler.get_last_lr()[0], grad_norm,
                        run.args.logging_steps, pos.first_step)  # fmt: skip
    if pos.window["retain_tokens"]:  # mean KL(base || tuned) a retain token, in nats
        record["retain_kl"] = round(pos.window["retain_kl"] / pos.window["retain_tokens"], 6)
    record["memory_gb"] = distributed.max_over_processes(run.accelerator, record["memory_gb"])
    if run.log is not None:
        run.log.write(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=pos.step)
    pos.window = new_window(time.perf_counter())


def evaluate_step(run: Run, step: int, best: BestTracker, bar: Any) -> bool:
    """Evaluate when due (every --eval_steps and at the last step); True when it did."""
    due = step == run.sched.total_steps or (run.args.eval_steps and step % run.args.eval_steps == 0)
    if not (run.has_val and due):
        return False
    record = {"step": step, **evaluate(run.loss_module, run.val_loader, run.accelerator)}
    mark = " (best)" if best.update(record, step) else ""
    if run.log is not None:
        run.log.write(record)
        bar.write(
            f"step {step}: eval_loss {record['eval_loss']:.4f}, "
            f"eval_token_acc {record['eval_token_acc']:.3f}{mark}"
        )
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    return True


def stop_early(best: BestTracker, step: int, total: int) -> bool:
    """True when --early_stop_interval evaluations in a row brought no better metric (and
    this is not the last step anyway); the loop then saves this step and ends."""
    if not (best.should_stop and step < total):
        return False
    logger.info(
        f"early stop at step {step}: {best.bad_evals} evaluations without a better "
        f"{best.key} (best {best.best} at step {best.best_step})"
    )
    return True


def stop_signalled(accelerator: Any, stop: StopRequest) -> bool:
    """Whether any process got SIGINT/SIGTERM: every process stops at the same step."""
    flag = torch.tensor(int(stop.requested is not None), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum"))


def sharded_optimizer_loader(run: Run) -> Any:
    """How an exact resume loads the optimizer: FSDP2's holds shards (None: the usual way)."""
    if not (run.strategy.sharded and run.accelerator.is_fsdp2):
        return None
    return lambda full: distributed.load_full_optimizer_state(run.optimizer, full)


def save_step(run: Run, pos: Position, best: BestTracker, end: int) -> None:
    """Save ``checkpoint-{step}`` (main process) and rotate the old ones; ``end`` is the step
    the run ends at (recorded as ``max_steps``). Every process takes part in gathering what
    is sharded or per-process; only the main process writes."""
    acc, sharded = run.accelerator, run.strategy.sharded
    acc.wait_for_everyone()
    save_only_model = run.args.save_only_model or not run.strategy.saves_optimizer
    gathered = Gathered(
        distributed.full_model_state(acc, run.loss_module, sharded),
        None if save_only_model else distributed.full_optimizer_state(acc, run.optimizer, sharded),
        distributed.gather_rng_states(acc),
    )
    if not acc.is_main_process:
        return
    state = {
        "global_step": pos.step,
        "max_steps": end,
        "epoch": pos.step / run.sched.steps_per_epoch,
        "epoch_index": pos.epoch,
        "micro": pos.consumed,
        "world_size": acc.num_processes,
    }
    pos.last_ckpt = save_checkpoint(
        run.run_dir,
        pos.step,
        model=run.accelerator.unwrap_model(run.loss_module).model,
        tokenizer=run.tokenizer,
        args=run.resolved,
        trainer_state=state,
        optimizer=None if save_only_model else run.optimizer,
        scheduler=run.scheduler,
        gathered=gathered,
    )
    if best.best_step == pos.step:
        best.checkpoint = pos.last_ckpt
    rotate(run.run_dir, run.args.save_total_limit, keep={pos.last_ckpt, best.checkpoint})


def finish(run: Run, pos: Position, best: BestTracker) -> None:
    """Close trackers and log, plot the curves, report; point the run at its best checkpoint
    with --load_best_model_at_end."""
    train_s = time.perf_counter() - pos.t0
    totals = {"tokens": pos.seen_tokens}
    distributed.sum_counts(run.accelerator, totals, ("tokens",))
    if run.log is not None:
        report(run, pos, best, train_s, totals["tokens"])
    distributed.finish(run.accelerator)  # every process leaves when the files are written


def report(run: Run, pos: Position, best: BestTracker, train_s: float, tokens: float) -> None:
    """Main process: close the log, plot the curves, say how it went."""
    assert run.log is not None
    run.log.close()
    plot_curves(run.run_dir / "logging.jsonl", run.run_dir / "images")
    logger.info(
        f"trained {pos.step - pos.first_step} steps in {train_s:.1f}s "
        f"({tokens / train_s:.0f} tokens/s in all); last checkpoint: {pos.last_ckpt}"
    )
    if best.best is not None:
        logger.info(
            f"best {best.key} {best.best} at step {best.best_step}: "
            f"{best.checkpoint or 'not saved (no checkpoint at that step)'}"
        )
    if run.args.load_best_model_at_end and best.checkpoint is not None:
        # `tunesmith infer --adapters RUN_DIR` then loads the best checkpoint.
        write_json(run.run_dir / "best_checkpoint.json", best.state())
