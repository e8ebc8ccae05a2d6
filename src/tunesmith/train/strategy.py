"""How several processes share the work: DDP (default), FSDP2 (``--fsdp``) or DeepSpeed ZeRO.

tunesmith has no distributed engine of its own: each strategy is one Accelerate plugin, and
the loop is the same for all of them. DDP keeps a whole copy of the model in every process
and averages gradients (the right choice for LoRA, whose gradients are small); FSDP2 and
ZeRO-3 shard the weights, gradients and optimizer state (the choice for full fine-tuning of a
model whose optimizer state does not fit one GPU); ZeRO-2 shards gradients and optimizer
state only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.utils import UserError

DEEPSPEED_INSTALL = "pip install 'tunesmith[deepspeed]'"
FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap", "fsdp2")
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


@dataclass(frozen=True)
class Strategy:
    """The parallel strategy a run asked for, checked before any model is loaded."""

    kind: str = "ddp"
    """``ddp`` (a full replica per process), ``fsdp`` (FSDP2) or ``deepspeed``."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered weights after each layer's forward (full_shard) or keep them
    until backward (shard_grad_op: more memory, fewer all-gathers)."""
    cpu_offload: bool = False
    """FSDP2: keep parameters, gradients and optimizer state in CPU memory."""
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed: the config (a preset's or the user's JSON); batch sizes filled in later."""

    @property
    def saves_optimizer(self) -> bool:
        """False under DeepSpeed: its ZeRO optimizer state is partitioned in its own format,
        so its checkpoints hold the weights only (resumed with --resume_only_model)."""
        return self.kind != "deepspeed"

    @property
    def sharded(self) -> bool:
        """True when no process holds the whole model (its state must be gathered to save)."""
        return self.kind == "fsdp" or (
            self.kind == "deepspeed" and self.deepspeed_config.get("zero_optimization", {})
            .get("stage", 0) == 3
        )  # fmt: skip


def parse_strategy(fsdp: str | None, deepspeed: str | None, quantization_bit: int = 0) -> Strategy:
    """``--fsdp`` / ``--deepspeed`` as a ``Strategy``; one sentence for what cannot run."""
    if fsdp and deepspeed:
        raise UserError("--fsdp and --deepspeed are two ways to shard the model: give one of them")
    if quantization_bit and (fsdp or deepspeed):
        flag = "--fsdp" if fsdp else "--deepspeed"
        raise UserError(
            f"--quantization_bit {quantization_bit} cannot be combined with {flag} in this "
            "version: sharding a bitsandbytes base needs a quantized storage dtype tunesmith "
            "does not set up; QLoRA runs on several GPUs with plain DDP (drop the flag; each "
            "GPU then holds the whole quantized base)"
        )
    if fsdp:
        return _fsdp(fsdp)
    if deepspeed:
        config = deepspeed_config(deepspeed)
        require_deepspeed(f"--deepspeed {deepspeed}")
        return Strategy(kind="deepspeed", deepspeed_config=config)
    return Strategy()


def check_resume(strategy: Strategy, resume: str | None, only_model: bool) -> None:
    """Refuse an exact resume the strategy cannot honour, before anything is loaded."""
    if resume and not only_model and not strategy.saves_optimizer:
        raise UserError(
            "--deepspeed checkpoints hold the weights but not DeepSpeed's partitioned optimizer "
            "state, so a run under --deepspeed cannot resume exactly: add --resume_only_model "
            "true (a new run from the checkpoint's weights), or resume with DDP or --fsdp"
        )


def _fsdp(value: str) -> Strategy:
    words = value.replace(",", " ").lower().split()
    if words in (["true"], ["1"], ["yes"]):
        words = ["full_shard"]
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown or not words:
        raise UserError(
            f"--fsdp {value!r}: expected some of {', '.join(FSDP_WORDS)} (e.g. --fsdp "
            "'full_shard auto_wrap'; FSDP2 is the only version used)"
        )
    if "full_shard" in words and "shard_grad_op" in words:
        raise UserError("--fsdp: full_shard and shard_grad_op exclude each other; give one")
    return Strategy(
        kind="fsdp",
        reshard_after_forward="shard_grad_op" not in words,
        cpu_offload="offload" in words,
    )


def deepspeed_config(value: str) -> dict[str, Any]:
    """A preset's DeepSpeed config (zero2, zero3, zero3_offload), or a JSON file's."""
    if value in DEEPSPEED_PRESETS:
        return _preset(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(
            f"--deepspeed {value}: expected {', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed JSON "
            "config file, and no such file exists"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def _preset(name: str) -> dict[str, Any]:
    """ms-swift's zero2/zero3/zero3_offload configs, with explicit sizes instead of "auto"
    (Accelerate fills "auto" bucket sizes from ``model.config``, which the loss wrapper lacks).
    Batch sizes, accumulation, clipping and precision stay "auto": the run's flags set them."""
    zero: dict[str, Any] = {
        "stage": 2,
        "overlap_comm": False,  # DeepSpeed's overlap leaks memory on some versions (ms-swift)
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if name != "zero2":
        zero.update({
            "stage": 3,
            "stage3_prefetch_bucket_size": 5e8,
            "stage3_param_persistence_threshold": 1e6,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # Checkpoints are plain HF / peft files: gather the full weights to save them.
            "stage3_gather_16bit_weights_on_model_save": True,
        })  # fmt: skip
    if name == "zero3_offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1e9,  # the loop logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }


def require_deepspeed(what: str) -> None:
    """Say in one sentence how to install DeepSpeed when it is missing."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{what} needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}")


def accelerator_plugins(
    strategy: Strategy, mixed_precision: str, ga: int, clip: float
) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator(...)`` that select ``strategy``.

    ``ga`` and ``clip`` are the run's gradient accumulation and clipping, which DeepSpeed
    applies itself. FSDP2's shard units (the decoder layers) are named once the model is
    loaded (``distributed.set_layers_to_shard``).
    """
    if strategy.kind == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        offload = None
        if strategy.cpu_offload:
            from torch.distributed.fsdp import CPUOffloadPolicy

            offload = CPUOffloadPolicy()
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=strategy.reshard_after_forward,
            auto_wrap_policy="transformer_based_wrap",
            cpu_offload=offload or False,
            state_dict_type="FULL_STATE_DICT",
            # Every process loads the weights itself: simple, and the checkpoint is the same.
            cpu_ram_efficient_loading=False,
            mixed_precision_policy=None if mixed_precision == "no" else mixed_precision,
        )}  # fmt: skip
    if strategy.kind == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        config = json.loads(json.dumps(strategy.deepspeed_config))  # a copy Accelerate may fill
        return {"deepspeed_plugin": DeepSpeedPlugin(
            hf_ds_config=config, gradient_accumulation_steps=ga, gradient_clipping=clip,
        )}  # fmt: skip
    return {}
