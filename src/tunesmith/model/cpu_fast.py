"""The CPU training path's switches (``--cpu_fast``), each measured on the peers' recipe.

On a CPU a LoRA step of a small model spends a third of its time outside the base matmuls
(``bench/RESULTS.md``, "CPU step profile"): per-operator cost of the ~170 LoRA layers,
the SDPA kernel's backward at a few dozen tokens, the optimizer's per-parameter loop. Parts:

- ``lora``: the LoRA layers reading one input (q/k/v, gate/up) as one autograd function
  with one A matmul (``lora_cpu.py``); peft's math, the shared dropout's masks;
- ``attn``: eager attention while training on the CPU when ``--attn_impl`` is ``sdpa``
  (at a few dozen tokens the CPU flash kernel's backward costs ~2 ms a layer);
- ``adamw``: torch's fused AdamW on the CPU (one kernel for all parameters);
- ``pack``: the frozen base weights prepacked once for oneDNN, used by ``lora``'s function
  (``packed_linear.py``; no effect without ``lora``);
- ``layers``: the frozen parts of each decoder layer (RMSNorm, RoPE + attention, SiLU·mul)
  as single autograd functions with hand-written backwards (``cpu_layers.py``);
- ``head``: the frozen LM head prepacked for oneDNN too (``packed_linear.pack_head``);
- ``compile``: ``torch.compile`` of each decoder layer (off by default: see RESULTS).

``auto`` (the default) is ``lora,attn,adamw,pack,head`` when training on the CPU and nothing
on a GPU; ``layers`` measured no faster on the peers' recipe (bench/RESULTS.md, session 6).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tunesmith.utils import parse_parts

PARTS = ("lora", "attn", "adamw", "pack", "layers", "head", "compile")
DEFAULT = ("lora", "attn", "adamw", "pack", "head")


@dataclass(frozen=True)
class CpuFast:
    """Which parts of the CPU training path to use."""

    lora: bool = False
    """Grouped LoRA function (one A matmul per shared input)."""
    attn: bool = False
    """Eager attention instead of SDPA while training on the CPU."""
    adamw: bool = False
    """Fused AdamW on the CPU."""
    pack: bool = False
    """Base weights prepacked for oneDNN in the grouped LoRA function."""
    layers: bool = False
    """Decoder layers' frozen parts as single autograd functions."""
    head: bool = False
    """The frozen LM head prepacked for oneDNN."""
    compile: bool = False
    """torch.compile of every decoder layer."""

    @classmethod
    def parse(cls, spec: str, cpu: bool = True) -> CpuFast:
        """``auto``, ``all``, ``none`` / ``off``, or a comma list of the parts; everything is
        off when not training on the CPU."""
        parts = parse_parts("--cpu_fast", spec, PARTS, DEFAULT)  # checked on any device
        if not cpu:
            parts = set()
        return cls(**{p: p in parts for p in PARTS})


def apply_cpu_fast(model: nn.Module, options: CpuFast, attn_impl: str) -> list[str]:
    """Switch on the CPU path's model parts on a (peft-wrapped) causal LM; what was done.

    Call after the LoRA dropout is shared and before the optimizer is built (no parameter is
    replaced: checkpoints and optimizer state stay peft's). ``adamw`` is the optimizer's.
    """
    done = []
    if options.attn and attn_impl == "eager":
        done.append("eager attention")
    if options.lora:
        from tunesmith.model.lora_cpu import group_lora_layers

        pack = options.pack and _packing_fits(model, done)
        routed, grouped = group_lora_layers(model, pack=pack)
        if routed:
            done.append(f"grouped LoRA on {routed} layers ({grouped} groups sharing an input)")
            if pack:
                done.append("base weights prepacked for oneDNN (where it has the dtype)")
    if options.layers:
        from tunesmith.model.cpu_layers import fuse_decoder_layers

        _, counts = fuse_decoder_layers(model)
        if any(counts.values()):
            done.append("fused RMSNorm/attention/SiLU·mul ({norm}, {attn}, {mlp})".format(**counts))
    if options.head and _packing_fits(model, done, head_only=True):
        from tunesmith.model.lora import hf_model
        from tunesmith.model.packed_linear import pack_head

        if pack_head(hf_model(model).get_output_embeddings()) is not None:
            done.append("LM head prepacked for oneDNN (where it has the dtype)")
    if options.compile:
        from tunesmith.model.lora import hf_model

        layers = hf_model(model).model.layers
        for layer in layers:
            layer.compile(dynamic=True)
        done.append(f"torch.compile of {len(layers)} decoder layers")
    if options.adamw:
        done.append("fused AdamW")
    return done


def _packing_fits(model: nn.Module, done: list[str], head_only: bool = False) -> bool:
    """Whether the two packed copies of the frozen linear weights (``pack``) fit in half of
    the memory still available; a 7B model in bf16 would need 28 GB more, and a run that
    trained before must not be pushed out of memory by a speed-up. Notes a refusal in
    ``done``. ``head_only``: the LM head's copies alone."""
    if head_only:
        from tunesmith.model.lora import hf_model

        head = hf_model(model).get_output_embeddings()
        mods = [head] if isinstance(head, nn.Linear) and not head.weight.requires_grad else []
    else:
        mods = [m for m in model.modules()
                if isinstance(m, nn.Linear) and not m.weight.requires_grad]  # fmt: skip
    need = 2 * sum(m.weight.numel() * m.weight.element_size() for m in mods)
    free = available_memory()
    if free is None or need <= free // 2:
        return True
    done.append(f"no prepacked weights: they need {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB is available")  # fmt: skip
    return False


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None when the
    system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
