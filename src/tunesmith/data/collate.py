"""Batches: right padding, or packing several samples into one sequence.

Packed rows carry ``position_ids`` that restart at 0 for every sample and no attention mask;
transformers then builds a block-diagonal causal mask from the position ids, so attention
never crosses from one sample into another.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.template import IGNORE, Sample


def pack(samples: list[Sample], max_length: int) -> list[list[Sample]]:
    """Group samples into packs of at most ``max_length`` tokens (first-fit decreasing).

    Deterministic for a given order of ``samples``; a sample longer than ``max_length`` (after
    truncation that cannot happen) gets a pack of its own.
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                packs[b].append(i)
                room[b] -= n
                break
        else:
            packs.append([i])
            room.append(max_length - n)
    # Keep the dataset's order inside and across packs, so shuffling stays meaningful.
    packs = [sorted(p) for p in packs]
    packs.sort(key=lambda p: p[0])
    return [[samples[i] for i in p] for p in packs]


def collate(
    batch: list[list[Sample]] | list[Sample],
    pad_id: int,
    retain_sources: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Tensors for one micro-batch. Items are samples, or packs (lists of samples).

    ``retain_sources``: ``--dataset`` values whose samples' tokens the batch's ``retain`` mask
    marks (``--retain_kl``); None: no mask.
    """
    import torch

    packed = bool(batch) and isinstance(batch[0], list)
    rows_ids, rows_labels, rows_pos, rows_retain = [], [], [], []
    for item in batch:
        parts = item if packed else [item]
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        keep: list[bool] = []
        for s in parts:
            ids += s.input_ids
            # A sample's first token is never predicted from inside the sample; in a packed row
            # it would be predicted from the previous sample's last token, so it carries no loss.
            labels += [IGNORE, *s.labels[1:]]
            pos += range(len(s.input_ids))
            if retain_sources is not None:
                keep += [s.tags.get("source") in retain_sources] * len(s.input_ids)
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(pos)
        rows_retain.append(keep)
    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, lab, pos) in enumerate(zip(rows_ids, rows_labels, rows_pos, strict=True)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(lab)
        position_ids[r, :n] = torch.tensor(pos)
        attention_mask[r, :n] = 1
        # Padding of a packed row becomes one more "sample" (positions from 0) that nothing
        # attends to from the real samples and that carries no loss.
        position_ids[r, n:] = torch.arange(width - n)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if retain_sources is not None:
        retain = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, keep in enumerate(rows_retain):
            retain[r, : len(keep)] = torch.tensor(keep, dtype=torch.bool)
        out["retain"] = retain
    if not packed:
        out["attention_mask"] = attention_mask
    return out
