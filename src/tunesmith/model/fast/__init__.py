"""The fast GPU training path: fused LoRA layers, Triton kernels, a logits-free loss.

One call, :func:`apply_fast_path`, after peft has wrapped the model, switches on what
``FastOptions`` asks for and what the model supports, and reports what it did:

- ``lora``: every plain peft LoRA layer runs as one autograd function in the compute dtype
  (``lora_fused.py``);
- ``group``: sibling projections of one input (QKV, gate/up) as one function
  (``lora_group.py``), with ``lora`` only;
- (with ``lora``) LoRA dropout from counter-based masks that recompute and CUDA graphs
  reproduce (``dropout.py``), so ``--lora_dropout`` > 0 keeps every part below on;
- ``kernels``: Liger's Triton RMSNorm, RoPE and SwiGLU on Qwen2/Llama-family models on CUDA,
  when ``liger-kernel`` is installed (``pip install 'tunesmith[liger]'``);
- ``loss``: the LM head's cross-entropy in chunks with the gradient formed in the forward
  (``loss.py``); the loss module reads it from ``FastOptions.loss``;
- ``graphs``: each decoder layer's forward and backward replayed as CUDA graphs for the
  run's fixed shape (``graphs.py``; cuts the host's kernel-issue time);
- ``embed``: a frozen, untied input embedding in pinned host memory (``embed.py``; applied
  by ``offload_embedding`` once the model is on the GPU).

Each is exact math (rounding aside), so each is on by default; ``--fast`` turns them off
one by one (``--fast none``, ``--fast lora,loss``) for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tunesmith.utils import parse_parts

FEATURES = ("lora", "group", "kernels", "loss", "graphs", "embed")
# What ``auto`` switches on with CUDA: the parts measured to win on the H200 (bench/RESULTS.md,
# issue 17): every part.
AUTO = FEATURES
LIGER_INSTALL = "pip install 'tunesmith[liger]'"


@dataclass
class FastOptions:
    """Which parts of the fast path to use."""

    lora: bool = True
    """Fused LoRA autograd function in the compute dtype."""
    group: bool = True
    """QKV and gate/up LoRA layers as one function each (needs ``lora``)."""
    kernels: bool = True
    """Liger's Triton RMSNorm/RoPE/SwiGLU on CUDA (skipped when liger-kernel is missing)."""
    loss: bool = True
    """Chunked linear cross-entropy with the gradient formed in the forward."""
    graphs: bool = True
    """Decoder layers replayed as CUDA graphs at the run's fixed shape (CUDA only)."""
    embed: bool = True
    """A frozen, untied input embedding kept in pinned host memory (CUDA only)."""

    @classmethod
    def parse(cls, spec: str, cuda: bool = True) -> FastOptions:
        """``auto``, ``all``, ``none`` / ``off``, or a comma list of ``FEATURES``.

        ``auto`` is ``AUTO`` on CUDA and ``none`` elsewhere: the parts were measured on an H200
        only, and the CPU path keeps its own measured choices (shared LoRA dropout masks,
        the LM head on label positions only).
        """
        parts = parse_parts("--fast", spec, FEATURES, AUTO if cuda else ())
        return cls(**{p: p in parts for p in FEATURES})


def apply_fast_path(model: nn.Module, options: FastOptions) -> list[str]:
    """Switch on the fast path on a (peft-wrapped) causal LM; returns what was done.

    Call after ``get_peft_model`` and before the optimizer is built; parameters are not
    replaced, so checkpoints and optimizer state are unaffected.
    """
    done = []
    if options.lora:
        from tunesmith.model.fast.lora_fused import patch_lora_layers

        patched, total = patch_lora_layers(model)
        if total:
            done.append(f"fused LoRA on {patched}/{total} layers")
        if options.group and patched:
            from tunesmith.model.fast.lora_group import group_lora_layers

            done.append(f"grouped LoRA: {group_lora_layers(model)} QKV and gate/up groups")
    if options.kernels:
        done.append(_apply_kernels(model))
    if options.loss:
        done.append("chunked linear cross-entropy")
    if options.graphs:
        from tunesmith.model.fast.graphs import enable_layer_graphs

        done.append(enable_layer_graphs(model))
    return [d for d in done if d]


def _apply_kernels(model: nn.Module) -> str:
    """Liger's RMSNorm, RoPE and SwiGLU on a CUDA Qwen2/Llama model; '' when not applicable."""
    import torch

    from tunesmith.model.lora import hf_model

    lm = hf_model(model)
    kind = lm.config.model_type
    # sft() loads the model on the CPU and Accelerate moves it to the GPU later: what counts
    # is whether training will run on CUDA (Liger's kernels are Triton, CUDA only).
    if not torch.cuda.is_available() or kind not in ("qwen2", "llama"):
        return ""
    try:
        from liger_kernel.transformers import (
            apply_liger_kernel_to_llama,
            apply_liger_kernel_to_qwen2,
        )
    except ImportError:
        return f"kernels skipped: liger-kernel is not installed ({LIGER_INSTALL})"
    apply = apply_liger_kernel_to_qwen2 if kind == "qwen2" else apply_liger_kernel_to_llama
    # The loss is ours (chunked, label rows only); Liger patches norms, RoPE and the MLP.
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
          fused_linear_cross_entropy=False, model=lm)  # fmt: skip
    return "Liger RMSNorm/RoPE/SwiGLU"
