"""Which records ``--retain_kl`` / ``--retain_ce`` apply to, and the flags' checks.

The retain records are those of the ``--dataset`` values named in ``--retain_dataset``
(default ``base-answers``, which the CLI has replaced by its cached file in both lists by the
time ``sft`` runs). Each sample carries its ``--dataset`` value as ``tags["source"]``, so the
collate function marks their tokens and the loss (``model/retain.py``) treats them apart.
"""

from __future__ import annotations

from tunesmith.config import SftArgs
from tunesmith.data.sources import split_spec
from tunesmith.model.retain import RetainWeights
from tunesmith.utils import UserError


def retain_weights(args: SftArgs) -> RetainWeights:
    """The retain weights of ``args`` (inactive with the defaults)."""
    return RetainWeights(kl=args.retain_kl, ce=args.retain_ce)


def check_retain(args: SftArgs) -> None:
    """Refuse retain flags that cannot work, before anything is loaded."""
    if args.retain_kl < 0 or args.retain_ce < 0:
        bad = "retain_kl" if args.retain_kl < 0 else "retain_ce"
        raise UserError(f"--{bad} must be >= 0, got {getattr(args, bad)}")
    if args.retain_kl > 0 and args.train_type == "full":
        raise UserError(
            "--retain_kl needs --train_type lora: the base model's distributions come from the "
            "same model with its LoRA adapter switched off"
        )
    retain_sources(args)


def retain_sources(args: SftArgs) -> frozenset[str] | None:
    """The ``--dataset`` values whose records are retain records; None when the retain flags
    are off (then nothing is marked and the loss is the plain one)."""
    if not retain_weights(args).active:
        return None
    names = {split_spec(s)[0] for s in args.retain_dataset}
    found = frozenset(s for s in args.dataset if split_spec(s)[0] in names)
    if not found:
        raise UserError(
            f"--retain_kl/--retain_ce apply to the records of --retain_dataset "
            f"{' '.join(args.retain_dataset)}, but --dataset has no such value "
            f"({' '.join(args.dataset) or 'none'})"
        )
    return found
