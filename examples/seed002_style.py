"""Seed 002's flow with tunesmith: fine-tune Qwen2.5 with LoRA from Python, then chat through
a transformers ``pipeline``.

The seed tokenizes "用户:…\\n助手:…" dialogues by hand, wraps the model in peft and runs
``Trainer``; here the dialogues are written as records, ``tunesmith.sft`` does the rest, and
``tunesmith.load`` gives the model back to transformers.

    python examples/seed002_style.py                      # the demo model
    python examples/seed002_style.py --model PATH --max_steps 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import tunesmith

DIALOGUES = [
    ("你好", "您好,请问有什么可以帮您?"),
    ("你们几点营业?", "我们每天上午九点到晚上九点营业。"),
    ("可以退货吗?", "可以,收到商品七天内无理由退货。"),
    ("怎么联系客服?", "您可以拨打客服热线,或在这里留言。"),
]


def main(argv: list[str] | None = None) -> str:
    """Train, load, answer one question; returns the answer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="base model (default: demo)")
    parser.add_argument("--output_dir", default=None, help="where runs go (default: a temp dir)")
    parser.add_argument("--max_steps", type=int, default=30)
    opts = parser.parse_args(argv)
    work = Path(opts.output_dir or tempfile.mkdtemp(prefix="seed002-"))
    data = work / "dialogues.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w", encoding="utf-8") as f:
        for query, response in DIALOGUES:
            f.write(json.dumps({"query": query, "response": response}, ensure_ascii=False) + "\n")

    run = tunesmith.sft(
        model=opts.model,
        dataset=[str(data)],
        max_steps=opts.max_steps,
        learning_rate=5e-4,
        report_to=["none"],
        output_dir=str(work / "output"),
        progress=False,
    )
    print(f"trained: {run.last_checkpoint} (final loss {run.metrics.get('loss')})")

    from transformers import pipeline

    model, tokenizer = tunesmith.load(run.run_dir, merge=True)
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = chat([{"role": "user", "content": "你好"}], max_new_tokens=32, do_sample=False)
    answer = out[0]["generated_text"][-1]["content"]
    print(f"answer: {answer}")
    return answer


if __name__ == "__main__":
    main()
