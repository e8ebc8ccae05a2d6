"""``--retain_kl``: distillation to the base model on the general (retain) records.

Training on the base model's own greedy answers (``--dataset base-answers``) asks the tuned
model to keep answering general prompts as before, but cross-entropy on a greedy answer teaches
only its argmax tokens: it sharpens the base's distribution, and its quirks spread to other
prompts (``bench/RESULTS.md``, "Retention across seeds, session 5"). The KL term compares the
whole next-token distribution instead:

    loss = sum over trained tokens of CE
           - (1 - retain_ce) * sum over retain tokens of CE
           + retain_kl * sum over retain tokens of KL(p_base || p_tuned)

where ``p_base`` comes from the same model with its LoRA adapter switched off (peft's
``disable_adapter()``), without gradient, so the gradient flows only into the adapter. At step
0 the adapter adds nothing (peft initialises B to zero), so the KL is 0; it grows only where the
identity training moves the model on the retain records, and pulls it back there. The loop
divides the sum by the trained tokens of the step, as for plain cross-entropy.

Cost: one more forward (no gradient, no activations kept) of the rows that hold retain tokens,
and the LM head on those tokens. The logits of a micro-batch are computed at once here (n x
vocab floats), not in the chunks the plain loss uses above ``LOGIT_CHUNK`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RetainWeights:
    """How the retain records' answer tokens are trained."""

    kl: float = 0.0
    """Weight of KL(base || tuned) per retain token (``--retain_kl``)."""
    ce: float = 1.0
    """Weight of the cross-entropy on the retain tokens (``--retain_ce``; 1 = as other tokens)."""

    @property
    def active(self) -> bool:
        """Whether the retain tokens are trained differently from the others."""
        return self.kl != 0.0 or self.ce != 1.0


def base_log_probs(
    peft_model: Any,
    lm: nn.Module,
    where: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The base model's next-token log-probabilities (n, vocab) at the positions ``where``
    (B, L-1) marks: the adapter switched off, no gradient, only the rows with such a position."""
    rows = where.any(1)

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[rows]

    with torch.no_grad(), peft_model.disable_adapter():
        hidden = lm.get_decoder()(
            input_ids=input_ids[rows],
            attention_mask=pick(attention_mask),
            position_ids=pick(position_ids),
            use_cache=False,
        ).last_hidden_state
        h = hidden[:, :-1][where[rows]]
        return lm.get_output_embeddings()(h).float().log_softmax(-1)


def retain_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    is_retain: torch.Tensor,
    base_logp: torch.Tensor | None,
    weights: RetainWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, KL sum) over trained tokens: ``logits`` (n, vocab) fp32 and ``targets`` (n,)
    of every trained token, ``is_retain`` (n,) marking the retain ones, ``base_logp`` the base
    model's log-probabilities at those (None: no KL)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    loss = ce[~is_retain].sum() + weights.ce * ce[is_retain].sum()
    kl = logits.new_zeros(())
    if base_logp is not None and base_logp.shape[0]:
        logp = logits[is_retain].log_softmax(-1)
        kl = F.kl_div(logp, base_logp, log_target=True, reduction="sum")
        loss = loss + weights.kl * kl
    return loss, kl
