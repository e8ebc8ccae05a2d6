"""Shared by the llamacpp backend's unit and integration tests: the skip reason, and the greedy
equivalence check of a llama.cpp answer against the ``pt`` engine's."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

BUILD_LOG = Path(__file__).resolve().parents[1] / ".venv" / "llamacpp-build.log"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed: `make test` builds it once into .venv "
    f"(why it could not: {BUILD_LOG}); or pip install 'tunesmith[llamacpp]'",
)


@dataclass
class Divergence:
    """Where a llama.cpp greedy answer first leaves the ``pt`` one, and pt's view of it."""

    position: int
    """Index of the first differing answer token."""
    pt_token: int
    """pt's greedy token there (its top-1)."""
    llama_token: int
    """llama.cpp's token there (an end-of-generation id when it stopped)."""
    rank: int
    """Rank of llama.cpp's token in pt's logits (0 = pt's top-1)."""
    gap: float
    """pt's top-1 logit minus its logit of llama.cpp's token."""


@torch.inference_mode()
def first_divergence(
    model, prompt: list[int], pt_ids: list[int], llama_ids: list[int], eos: int
) -> Divergence | None:
    """None when both answers are the same token ids; else the first divergent position with
    pt's top-1 / llama.cpp token logits there (``eos`` stands for llama.cpp having stopped)."""
    n = next((i for i, (a, b) in enumerate(zip(pt_ids, llama_ids, strict=False)) if a != b), None)
    if n is None:
        if len(pt_ids) == len(llama_ids):
            return None
        n = min(len(pt_ids), len(llama_ids))
    pt_tok = pt_ids[n] if n < len(pt_ids) else eos
    llama_tok = llama_ids[n] if n < len(llama_ids) else eos
    logits = model(torch.tensor([prompt + pt_ids[:n]])).logits[0, -1].float()
    rank = int((logits > logits[llama_tok]).sum())
    gap = float(logits.max() - logits[llama_tok])
    return Divergence(n, pt_tok, llama_tok, rank, gap)
