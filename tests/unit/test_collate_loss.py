"""Packing, collation and the token-summed loss: packed == padded == one by one, exactly."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.collate import collate, pack
from tunesmith.data.messages import Conversation, Message
from tunesmith.data.template import IGNORE, Sample, encode
from tunesmith.model import lora as lora_mod
from tunesmith.model.lora import CausalLMLoss, lora_config
from tunesmith.options import LoraOptions

PAIRS = [
    ("Hello, world!", "I am fine, thank you."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("你好，世界！今天天气怎么样？", "我是一个人工智能助手，很高兴为你服务。"),
    (
        "Write a short poem about the sea, the wind and the stars at night.",
        "The wind and the stars at night,\nthe sea is calm and bright.",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is several times faster than two on a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def samples(tiny_tokenizer) -> list[Sample]:
    out = []
    for i, (q, a) in enumerate(PAIRS):
        msgs = [Message("user", q), Message("assistant", a)]
        if i == 1:  # one multi-turn sample
            msgs = [Message("user", "Hi"), Message("assistant", "Hello!"), *msgs]
        s = encode(tiny_tokenizer, Conversation(msgs, origin=f"s{i}"), max_length=4096)
        assert s is not None
        out.append(s)
    assert len({len(s.input_ids) for s in out}) == len(out)  # all lengths differ
    return out


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def pad_id(tiny_tokenizer) -> int:
    return tiny_tokenizer.pad_token_id


def run_loss(model, batch) -> tuple[float, int, int]:
    with torch.no_grad():
        loss, n, correct = CausalLMLoss(model)(**batch)
    return float(loss), int(n), int(correct)


def one_by_one(model, samples, pad_id) -> tuple[float, int, int]:
    parts = [run_loss(model, collate([s], pad_id)) for s in samples]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)


# --- pack and collate -------------------------------------------------------------------------


@pytest.mark.parametrize("room", ["smaller", "longest", "double", "all"])
def test_pack_keeps_every_sample_once_within_max_length(samples, room) -> None:
    many = [
        Sample(list(s.input_ids), list(s.labels), f"{s.origin}-{k}")
        for k in range(3)
        for s in samples
    ]
    lens = [len(s.input_ids) for s in many]
    max_length = {
        "smaller": max(lens) - 1,
        "longest": max(lens),
        "double": 2 * max(lens),
        "all": sum(lens),
    }[room]
    packs = pack(many, max_length)
    # Every sample exactly once (by identity).
    assert sorted(id(s) for p in packs for s in p) == sorted(id(s) for s in many)
    for p in packs:
        total = sum(len(s.input_ids) for s in p)
        # Within max_length; a sample that is longer on its own gets a pack of its own.
        assert total <= max_length or (len(p) == 1 and total > max_length)
    assert sum(len(p) == 1 and len(p[0].input_ids) > max_length for p in packs) == sum(
        n > max_length for n in lens
    )
    assert len(packs) >= -(-sum(lens) // max_length)
    if room == "all":
        assert len(packs) == 1
    if room == "double":
        assert len(packs) < len(many)  # packing actually packs
    # Deterministic, and the dataset's order is kept inside and across packs.
    assert [[s.origin for s in p] for p in pack(many, max_length)] == [
        [s.origin for s in p] for p in packs
    ]
    position = {id(s): i for i, s in enumerate(many)}
    for p in packs:
        assert [position[id(s)] for s in p] == sorted(position[id(s)] for s in p)
    firsts = [position[id(p[0])] for p in packs]
    assert firsts == sorted(firsts)


def test_collate_packed_rows(samples, pad_id) -> None:
    lens = [len(s.input_ids) for s in samples]
    packs = [samples[:3], samples[3:]]
    batch = collate(packs, pad_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    width = sum(lens[:3])
    assert batch["input_ids"].shape == (2, width)
    row0 = batch["input_ids"][0].tolist()
    assert row0 == samples[0].input_ids + samples[1].input_ids + samples[2].input_ids
    # A sample's first token is never a target (it is not, run on its own, either).
    expected_labels = [t for s in samples[:3] for t in [IGNORE, *s.labels[1:]]]
    assert batch["labels"][0].tolist() == expected_labels
    assert expected_labels == samples[0].labels + samples[1].labels + samples[2].labels
    expected_pos = [p for n in lens[:3] for p in range(n)]
    assert batch["position_ids"][0].tolist() == expected_pos
    # The shorter row: the sample, then padding that starts again at position 0.
    n3 = lens[3]
    assert batch["input_ids"][1, :n3].tolist() == samples[3].input_ids
    assert (batch["input_ids"][1, n3:] == pad_id).all()
    assert (batch["labels"][1, n3:] == IGNORE).all()
    assert batch["position_ids"][1].tolist() == list(range(n3)) + list(range(width - n3))


def test_collate_padded_rows(samples, pad_id) -> None:
    batch = collate(samples, pad_id)
    lens = [len(s.input_ids) for s in samples]
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, max(lens))
    for r, s in enumerate(samples):
        n = lens[r]
        assert batch["input_ids"][r, :n].tolist() == s.input_ids
        assert batch["labels"][r, :n].tolist() == s.labels
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (max(lens) - n)
        assert (batch["labels"][r, n:] == IGNORE).all()
        assert batch["position_ids"][r, :n].tolist() == list(range(n))


# --- the loss -----------------------------------------------------------------------------------


def test_packed_loss_equals_one_by_one_and_padded(model, samples, pad_id) -> None:
    ref_loss, ref_n, ref_correct = one_by_one(model, samples, pad_id)
    assert ref_n == sum(sum(1 for t in s.labels[1:] if t != IGNORE) for s in samples)
    assert ref_loss > 0

    packed = run_loss(model, collate([samples], pad_id))  # all 4 in one row
    assert packed[1] == ref_n and packed[2] == ref_correct
    assert packed[0] == pytest.approx(ref_loss, abs=1e-4, rel=1e-6)

    two_rows = run_loss(model, collate(pack(samples, 120), pad_id))  # packed rows + padding
    assert len(pack(samples, 120)) >= 2
    assert two_rows[1] == ref_n
    assert two_rows[0] == pytest.approx(ref_loss, abs=1e-4, rel=1e-6)

    padded = run_loss(model, collate(samples, pad_id))
    assert padded[1] == ref_n and padded[2] == ref_correct
    assert padded[0] == pytest.approx(ref_loss, abs=1e-4, rel=1e-6)


def test_packing_without_restarting_positions_would_differ(model, samples, pad_id) -> None:
    """Negative control: the equality above depends on the block-diagonal attention."""
    batch = collate([samples], pad_id)
    ref_loss, _, _ = one_by_one(model, samples, pad_id)
    width = batch["input_ids"].shape[1]
    leaky = dict(batch, position_ids=torch.arange(width)[None])
    assert abs(run_loss(model, leaky)[0] - ref_loss) > 1e-2


def test_loss_equals_transformers_own_loss(model, samples, pad_id) -> None:
    for s in samples:
        batch = collate([s], pad_id)
        ours, n, _ = run_loss(model, batch)
        with torch.no_grad():
            hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
        assert ours == pytest.approx(float(hf) * n, rel=1e-5, abs=1e-4)


def test_chunked_head_gives_the_same_loss(model, samples, pad_id, monkeypatch) -> None:
    batch = collate(samples, pad_id)
    whole = run_loss(model, batch)
    monkeypatch.setattr(lora_mod, "LOGIT_CHUNK", 7)
    chunked = run_loss(model, batch)
    assert chunked[1:] == whole[1:]
    assert chunked[0] == pytest.approx(whole[0], abs=1e-4, rel=1e-6)


def test_packed_left_truncated_sample_does_not_learn_across_the_boundary(
    tiny_tokenizer, model, samples, pad_id
) -> None:
    """A sample cut on the left can start inside a reply; packed after another sample, its
    first token must not become a target of the previous sample's last position."""
    conv = Conversation([Message("user", "Hi"), Message("assistant", PAIRS[3][1])])
    cut = encode(tiny_tokenizer, conv, max_length=8, truncation="left")
    assert cut is not None and cut.labels[0] != IGNORE  # starts inside the reply
    pair = [samples[0], cut]
    ref = one_by_one(model, pair, pad_id)
    packed = run_loss(model, collate([pair], pad_id))
    assert packed[1] == ref[1]
    assert packed[0] == pytest.approx(ref[0], abs=1e-4)
    boundary = len(samples[0].input_ids)
    assert collate([pair], pad_id)["labels"][0, boundary] == IGNORE


# --- gradient accumulation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model(make_tiny_model):
    from peft import get_peft_model

    cfg = lora_config(LoraOptions(rank=4, alpha=8, dropout=0.0))
    cfg.init_lora_weights = False  # random (nonzero) B, so every LoRA weight gets a gradient
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        peft_model = get_peft_model(make_tiny_model(seed=1), cfg)
    return peft_model


def lora_grads(peft_model, batches: list[dict], total: int) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA weights after backward of sum(loss_sum) / total over batches."""
    peft_model.zero_grad(set_to_none=True)
    loss_module = CausalLMLoss(peft_model)
    for b in batches:
        loss_sum, _, _ = loss_module(**b)
        (loss_sum / total).backward()
    grads = {
        n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad
    }
    peft_model.zero_grad(set_to_none=True)
    return grads


def test_gradient_accumulation_equals_one_big_batch(lora_model, samples, pad_id) -> None:
    trainable = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    total = sum(int((collate([s], pad_id)["labels"][:, 1:] != IGNORE).sum()) for s in samples)

    big = lora_grads(lora_model, [collate(samples, pad_id)], total)
    micro = lora_grads(lora_model, [collate([s], pad_id) for s in samples], total)
    packed = lora_grads(lora_model, [collate([samples], pad_id)], total)

    for name in trainable:
        assert big[name].abs().sum() > 0, name  # non-trivial for lora_A and lora_B alike
        torch.testing.assert_close(micro[name], big[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed[name], big[name], atol=1e-5, rtol=1e-4)

    # Negative control: averaging per micro-batch means (not token-normalised) differs.
    naive = {n: torch.zeros_like(g) for n, g in big.items()}
    for s in samples:
        b = collate([s], pad_id)
        n_s = int((b["labels"][:, 1:] != IGNORE).sum())
        for name, g in lora_grads(lora_model, [b], n_s * len(samples)).items():
            naive[name] += g
    worst = max(float((naive[n] - big[n]).abs().max() / big[n].abs().max()) for n in trainable)
    assert worst > 1e-2
