"""How far a tuned run moved from the base model on general prompts, as a continuous figure:
the mean KL(base || tuned) a token, teacher-forced on the base model's own greedy answers.

The retention score of one run moves by whole flipped items (a standard error of ±3–4.5
points on 96 items, bench/RESULTS.md), so it cannot tell a recipe that stays closer to the
base from one that was lucky. This scores each run on two prompt sets: the 40 base answers it
trained on (``train``), and the base model's answers to the 96 retention items of its own
``tunesmith eval`` (``eval``: prompts never trained on). Figures: bench/RESULTS.md,
"Retention, session 6".

Usage: python bench/retain_kl_probe.py RUN_DIR...   (each an evaluated run: RUN/eval/answers.jsonl)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from retention_seeds import B_ANSWERS

from tunesmith.data.messages import Conversation, Message
from tunesmith.data.template import IGNORE, encode


def convs(run: Path, system: str) -> dict[str, list[Conversation]]:
    """The two prompt sets, each a list of (system, prompt, base answer) conversations."""
    train = [json.loads(x) for x in Path(B_ANSWERS).read_text().splitlines() if x]
    rows = [json.loads(x) for x in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    base = [r for r in rows if r["dataset"] == "retention" and r["model"] == "demo"]
    out = {"train": [(r["query"], r["response"]) for r in train],
           "eval": [(r["messages"][-1]["content"], r["response"]) for r in base]}  # fmt: skip
    return {k: [Conversation([Message("system", system), Message("user", q),
                              Message("assistant", a)]) for q, a in v]
            for k, v in out.items()}  # fmt: skip


def mean_kl(model, tok, items: list[Conversation]) -> float:
    """Mean KL(base || tuned) a trained token over ``items`` (adapter off = base)."""
    total, n = 0.0, 0
    for conv in items:
        s = encode(tok, conv, max_length=1024)
        ids = torch.tensor([s.input_ids])
        where = torch.tensor(s.labels[1:]) != IGNORE
        with torch.no_grad():
            tuned = model(input_ids=ids).logits[0, :-1][where].float().log_softmax(-1)
            with model.disable_adapter():
                base = model(input_ids=ids).logits[0, :-1][where].float().log_softmax(-1)
        total += float((base.exp() * (base - tuned)).sum())
        n += int(where.sum())
    return total / max(1, n)


def main() -> None:
    """Print one line per run: KL a token on the trained and on the eval prompts."""
    from peft import PeftModel

    from tunesmith.model.load import load_model, load_tokenizer

    for arg in sys.argv[1:]:
        run = Path(arg)
        args = json.loads((run / "args.json").read_text())
        ckpts = [p.parent for p in run.glob("checkpoint-*/adapter_config.json")]
        ckpt = max(ckpts, key=lambda p: int(p.name.split("-")[1]))
        tok = load_tokenizer(Path(args["model_dir"]))
        model = PeftModel.from_pretrained(
            load_model(Path(args["model_dir"]), torch.bfloat16, "sdpa"), str(ckpt)
        ).eval()
        sets = convs(run, args["system"])
        kls = {k: mean_kl(model, tok, v) for k, v in sets.items()}
        print(f"{run}: KL a token train {kls['train']:.4f}, eval {kls['eval']:.4f}", flush=True)


if __name__ == "__main__":
    main()
