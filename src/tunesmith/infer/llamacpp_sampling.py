"""Sampling of the llamacpp backend: tunesmith's own, so the flags mean what they mean on ``pt``.

Unset flags keep the model's ``generation_config.json`` (none for a bare ``.gguf``: greedy),
``--temperature 0`` is greedy, the repetition penalty covers the prompt too, then temperature,
top-k, top-p, in the order of transformers' ``generate`` (checked against its warpers in
tests/unit/test_llamacpp_backend.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import InferCommandArgs


@dataclass
class GenOptions:
    """How to generate one answer; ``None`` keeps the model's generation config, as on ``pt``."""

    max_new_tokens: int = 512
    """Most tokens generated (fewer when the context is full)."""
    temperature: float | None = None
    """Sampling temperature; 0 = greedy."""
    top_p: float | None = None
    """Nucleus sampling probability mass."""
    top_k: int | None = None
    """Sample from the k most likely tokens."""
    repetition_penalty: float | None = None
    """transformers' repetition penalty over prompt and answer (1.0 = none)."""
    seed: int | None = None
    """Seed this answer's sampling alone; None continues the engine's random stream."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer (not included in it)."""


def gen_options(args: InferCommandArgs) -> GenOptions:
    """The ``GenOptions`` of ``infer``'s flags (``--max_new_tokens``, ``--temperature`` …)."""
    return GenOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


@dataclass
class Sampling:
    """Resolved sampling settings of one request (transformers' defaults under the flags)."""

    do_sample: bool
    """False: greedy (argmax after the repetition penalty)."""
    temperature: float
    """Divides the logits when sampling."""
    top_k: int
    """Keep the k most likely tokens (0: all)."""
    top_p: float
    """Keep the smallest set of tokens whose probability reaches this."""
    repetition_penalty: float
    """Logits of tokens already in the sequence: divided (positive) or multiplied (negative)."""


def resolve_sampling(gen: GenOptions, defaults: dict[str, Any]) -> Sampling:
    """``gen`` over the model's generation config over transformers' defaults, as ``pt`` does."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(gen, name)
        return value if value is not None else defaults.get(name, fallback)

    if gen.temperature is not None:
        do_sample = gen.temperature > 0
    else:
        do_sample = bool(defaults.get("do_sample", False))
    temperature = float(pick("temperature", 1.0)) if do_sample else 1.0
    return Sampling(do_sample, temperature, int(pick("top_k", 50) or 0),
                    float(pick("top_p", 1.0)), float(pick("repetition_penalty", 1.0)))  # fmt: skip


def generation_config(model_dir: Path | None) -> dict[str, Any]:
    """The sampling keys of ``model_dir/generation_config.json`` ({} when absent)."""
    path = model_dir / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def token_probs(logits: np.ndarray, seen: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The candidate next tokens and their probabilities, from the last position's ``logits``
    (float32, modified in place); greedy decoding gives the one argmax token.

    ``seen`` marks every token id of the sequence so far (prompt included), as transformers'
    ``RepetitionPenaltyLogitsProcessor`` reads ``input_ids``; the order of the warpers
    (penalty, temperature, top-k, top-p) is ``generate``'s.
    """
    if s.repetition_penalty != 1.0:
        rp = s.repetition_penalty
        hit = logits[seen]
        logits[seen] = np.where(hit < 0, hit * rp, hit / rp)
    if not s.do_sample:
        return np.array([int(np.argmax(logits))]), np.ones(1)
    ids = np.arange(logits.size)
    if 0 < s.top_k < logits.size:
        ids = np.argpartition(-logits, s.top_k - 1)[: s.top_k]
    vals = logits[ids].astype(np.float64) / s.temperature
    order = np.argsort(-vals, kind="stable")
    ids, vals = ids[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if s.top_p < 1.0:
        # Keep tokens until their mass reaches top_p (the one that crosses it included).
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def pick_token(logits: np.ndarray, seen: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token: :func:`token_probs`' argmax, or a draw from its distribution."""
    ids, probs = token_probs(logits, seen, s)
    return int(ids[0]) if ids.size == 1 else int(rng.choice(ids, p=probs))
