"""What the loop does differently when several processes train one model.

Everything here is a no-op, or the plain single-process operation, in a run of one process:
one code path for a laptop and for many GPUs. Rules it implements:

- every process agrees on the run directory (rank 0 names it);
- only rank 0 writes files and log lines (the others log warnings only);
- counts of tokens are summed over the processes before they are logged;
- a sharded model (FSDP2, ZeRO-3) is gathered into one ordinary state dict to be saved, so
  a checkpoint of N processes is the very format of a checkpoint of one, and the optimizer
  state is gathered and keyed by parameter index the same way;
- every rank's random state goes into the checkpoint, so a resume with the same number of
  processes continues every rank's dropout exactly.
"""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.utils import logger


def init_state() -> Any:
    """Accelerate's process state, multi-process on CPU too (gloo) when started by torchrun.

    Accelerate only looks for CPU workers when asked for the CPU, so a machine without a GPU
    asks for it; with GPUs it finds them (NCCL) itself.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def quiet_other_ranks(is_main: bool) -> None:
    """Keep the log to rank 0's lines; other ranks still report warnings and errors."""
    if not is_main:
        logger.setLevel(logging.WARNING)


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every process (e.g. the run directory, named from the clock)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def sum_counts(accelerator: Any, window: dict[str, float], keys: tuple[str, ...]) -> None:
    """Replace ``window[k]`` (this process's count) by the sum over all processes, in place."""
    if accelerator.num_processes == 1:
        return
    import torch

    t = torch.tensor([float(window[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    for k, v in zip(keys, t.tolist(), strict=True):
        window[k] = v


def micro_step(accelerator: Any, module: Any, last: bool) -> Any:
    """The context of one micro-batch's forward and backward: gradients are synchronised
    (and, under DeepSpeed, the optimizer steps) on the step's last micro-batch only."""
    from contextlib import nullcontext

    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed steps inside backward when Accelerate says the gradients sync; the loop
        # groups its own micro-batches (a short last group per epoch), so it says when.
        accelerator.gradient_state._set_sync_gradients(last)
        return nullcontext()
    return nullcontext() if last else accelerator.no_sync(module)


def loss_scale(accelerator: Any, ga: int) -> int:
    """Factor of the summed loss before dividing by the step's global token count.

    DDP, FSDP and DeepSpeed average gradients over the processes: times their number gives
    the sum. DeepSpeed also divides each micro-batch's loss by the accumulation steps, which
    the loop's normalisation already does: times ``ga`` undoes it.
    """
    from accelerate.utils import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return accelerator.num_processes * (ga if deepspeed else 1)


def max_over_processes(accelerator: Any, value: float) -> float:
    """The largest ``value`` of all processes (e.g. peak memory), on every process."""
    if accelerator.num_processes == 1:
        return value
    import torch

    t = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="max")[0])


def fsdp_on_cpu(accelerator: Any, plugins: dict[str, Any]) -> None:
    """Turn FSDP2 on for CPU processes (gloo), which Accelerate leaves as plain DDP.

    Accelerate enables FSDP on accelerators only; PyTorch's FSDP2 itself shards over gloo
    on CPU too. Without this, ``--fsdp`` on CPU would silently train unsharded.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    plugin = plugins.get("fsdp_plugin")
    state = accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # Accelerate copies the process state into its accelerator state whenever one is made:
    # both must say FSDP, as they do on GPUs.
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def set_layers_to_shard(accelerator: Any, hf: Any) -> None:
    """FSDP2: one shard unit per decoder layer (the model's ``_no_split_modules``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and accelerator.is_fsdp2:
        plugin.transformer_cls_names_to_wrap = list(hf._no_split_modules or [])


def full_model_state(accelerator: Any, loss_module: Any, sharded: bool) -> dict[str, Any] | None:
    """The whole model's state dict on rank 0 (empty elsewhere), for ``save_pretrained``.

    Only for sharded models (FSDP2, ZeRO-3), and then a collective: every rank calls it. None
    otherwise: ``save_pretrained`` then reads rank 0's replica directly. Keys lose the loss
    wrapper's ``model.`` prefix, so they are those of the (peft) model.
    """
    if not sharded:
        return None
    if accelerator.is_fsdp2:
        state = _gather_dtensors(loss_module.state_dict(), accelerator.is_main_process)
    else:  # DeepSpeed ZeRO-3 gathers its partitions itself
        state = accelerator.get_state_dict(loss_module)
    return {k.removeprefix("model."): v for k, v in state.items()}


def full_optimizer_state(accelerator: Any, optimizer: Any, sharded: bool) -> dict[str, Any] | None:
    """FSDP2: the optimizer state with every shard gathered, on rank 0 (a collective).

    The optimizer holds the sharded parameters in the order they were handed to it, so its
    ``state_dict()`` is already keyed by index like an unsharded optimizer's; only the
    sharded tensors (the Adam moments) need gathering. None when not sharded by FSDP2.
    """
    if not (sharded and accelerator.is_fsdp2):
        return None
    full = optimizer.state_dict()
    main = accelerator.is_main_process
    state = {i: _gather_dtensors(s, main) for i, s in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


def load_full_optimizer_state(optimizer: Any, full: dict[str, Any]) -> None:
    """FSDP2: load an index-keyed full optimizer state; each rank keeps its own shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, values in full["state"].items():
        param = params[int(i)]
        state[i] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and v.dim() > 0 and v.shape == param.shape
            else v
            for k, v in values.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def _gather_dtensors(state: dict[str, Any], main: bool, keep_all: bool = False) -> dict[str, Any]:
    """Full CPU copies of the sharded tensors of ``state`` (all ranks take part in each
    all-gather; only rank 0 keeps the result unless ``keep_all``), one tensor at a time so a
    GPU never holds more than one gathered tensor."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in state.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if main:
            out[k] = v.detach().cpu() if hasattr(v, "detach") else v
    return out


def gather_rng_states(accelerator: Any) -> list[dict[str, Any]] | None:
    """Every rank's random state on rank 0 (a collective); None in a run of one process."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return gather_object([rng_state()])


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and (its GPU's) CUDA random states, as plain data."""
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def finish(accelerator: Any) -> None:
    """End the run together: trackers closed, then the process group, on every rank at once.

    Accelerate's ``end_training`` destroys the process group; a rank that does so while
    another still works (rank 0 writing its last files) can leave gloo's threads blocked in
    the group's destructor, and the run never ends.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    accelerator.end_training()


def micro_batches_to_skip(position: dict[str, Any], world_size: int) -> int:
    """Micro-batches of the resumed epoch each process skips, for ``world_size`` processes.

    Accelerate deals batch i of the epoch to process i mod N, so a checkpoint of N processes
    that each consumed ``micro`` batches has used the epoch's first ``micro * N``: resumed with
    M processes, each skips ``micro * N / M`` (rounded down when it does not divide).
    """
    saved = int(position.get("world_size", 1))
    micro = int(position["micro"])
    if saved == world_size:
        return micro
    logger.info(
        f"resuming a checkpoint of {saved} process(es) with {world_size}: the data position "
        "carries over, the random state of rank 0 is used (keep the global batch the same "
        "with --gradient_accumulation_steps for the same optimisation)"
    )
    return micro * saved // world_size


def describe(accelerator: Any) -> str:
    """How the processes share the model, for the log line that starts training."""
    n = accelerator.num_processes
    if n == 1:
        return ""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if accelerator.is_fsdp2:
        how = "FSDP2, weights sharded"
    elif kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        how = f"DeepSpeed ZeRO-{stage}"
    else:
        how = "DDP, one replica each"
    return f"; {n} processes ({how}, {accelerator.state.backend})"
