"""LoRA adapters (peft) and the training loss module."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.model.retain import RetainWeights, base_log_probs, retain_loss
from tunesmith.options import LoraOptions
from tunesmith.utils import IGNORE

# Above this many trained tokens per micro-batch the logits are computed in chunks with
# recomputation, so a long GPU batch never holds an (n_tokens x vocab) fp32 matrix.
LOGIT_CHUNK = 4096


def lora_config(opts: LoraOptions) -> Any:
    """A peft ``LoraConfig`` from the LoRA options.

    ``target_modules`` is ``all-linear``, a list of module names, or one regular expression
    (peft matches a single string as a full-name regex).
    """
    from peft import LoraConfig

    target_modules = list(opts.target_modules)
    targets: str | list[str]
    if target_modules == ["all-linear"] or target_modules == []:
        targets = "all-linear"
    elif len(target_modules) == 1 and re.search(r"[\\.*+?()\[\]|^$]", target_modules[0]):
        targets = target_modules[0]
    else:
        targets = list(target_modules)
    return LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=targets,
        modules_to_save=list(opts.modules_to_save) or None,
        use_rslora=opts.use_rslora,
        use_dora=opts.use_dora,
        task_type="CAUSAL_LM",
    )


def keep_activation_dtype(model: nn.Module) -> None:
    """Stop peft from casting each LoRA layer's input to fp32 (the adapter weights' dtype).

    Under autocast the fp32 LoRA weights are cast to the compute dtype instead, which is
    cheap (rank x width); casting the activations costs ~10% of a CPU step.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)  # PeftModel; plain HF models lack it
    return get_base() if get_base is not None else model


class CausalLMLoss(nn.Module):
    """Wraps a causal LM and returns (sum of token losses, trained tokens, correct tokens).

    The LM head runs only on positions that carry loss: on the self-cognition data a third
    of the tokens are trained, and the 151,936-wide head is a quarter of a 0.5B model's
    FLOPs. Returning the *sum* lets the loop normalise by the token count of the whole
    optimizer step, so gradient accumulation gives the same gradients as one big batch.
    Accelerate prepares this module (not the inner model), so DDP/FSDP see the whole forward.
    """

    def __init__(
        self, model: nn.Module, fused_ce: bool = False, retain: RetainWeights | None = None
    ) -> None:
        super().__init__()
        self.model = model
        # A frozen plain-Linear head's loss through model.fast.loss (no logits kept).
        self.fused_ce = fused_ce
        # --retain_kl / --retain_ce on the tokens a batch's ``retain`` mask marks (retain.py).
        self.retain = retain or RetainWeights()
        self.retain_stats = (0.0, 0)  # KL sum and retain tokens of the last forward (the log)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        retain: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss sum, number of trained tokens and number predicted right, for one batch;
        ``retain`` (B, L) marks the tokens of retain records (``model/retain.py``)."""
        lm = hf_model(self.model)
        hidden = lm.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        h = hidden[:, :-1][keep]
        t = targets[keep]
        head = lm.get_output_embeddings()
        if retain is not None and self.retain.active:
            where = keep & retain[:, 1:]
            base_logp = None
            if self.retain.kl and where.any():
                base_logp = base_log_probs(self.model, lm, where, input_ids, position_ids,
                                           attention_mask)  # fmt: skip
            logits = head(h).float()
            loss, kl = retain_loss(logits, t, retain[:, 1:][keep], base_logp, self.retain)
            self.retain_stats = (float(kl.detach()), int(where.sum()))
            return _pack(loss, (logits.argmax(-1) == t).sum(), t.numel())
        frozen = type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
        if self.fused_ce and frozen:
            from tunesmith.model.fast.loss import linear_cross_entropy

            return _pack(*linear_cross_entropy(h, head.weight, t), t.numel())
        if h.shape[0] <= LOGIT_CHUNK:
            return _pack(*_ce(head, h, t), t.numel())
        loss = h.new_zeros((), dtype=torch.float32)
        correct = t.new_zeros(())
        for s in range(0, h.shape[0], LOGIT_CHUNK):
            part_loss, part_correct = torch.utils.checkpoint.checkpoint(
                _ce, head, h[s : s + LOGIT_CHUNK], t[s : s + LOGIT_CHUNK], use_reentrant=False
            )
            loss = loss + part_loss
            correct = correct + part_correct
        return _pack(loss, correct, t.numel())


def _ce(head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()
    return F.cross_entropy(logits, t, reduction="sum"), (logits.argmax(-1) == t).sum()


def _pack(
    loss: torch.Tensor, correct: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return loss, torch.tensor(n, device=loss.device), correct
