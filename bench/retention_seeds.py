"""Retention across seeds: the demo's sft recipe (or a variant) trained with several ``--seed``
values, each run scored by ``tunesmith eval``; one JSON line per run, then a table.

The demo's identity recipe moves the retention score by several points from one run to the
next, so one run says little about a 1-point goal. This trains each (recipe, seed) pair, evals
it (identity + retention, base answers cached), and prints per run the identity accuracy per
language, the retention score and its parts, and which retention items flipped against the base
model. Figures: bench/RESULTS.md, "Retention across seeds, session 5".

Usage (each sft/eval under the heavy wrapper, so that timings of others are not disturbed):
    python bench/retention_seeds.py --recipe B --seeds 1 2 3 --out /tmp/rs --wrap /work/wt/heavy
    python bench/retention_seeds.py --table /tmp/rs   # the table of every run so far
Extra sft flags after ``--``: they are appended to the recipe (and named in the run's label).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from tunesmith.eval.retention import retention_items

DEMO = [
    "--model", "demo", "--model_name", "小智", "XiaoZhi", "--model_author", "星河", "Xinghe",
    "--system", "You are a helpful assistant.", "--packing", "true", "--max_length", "256",
    "--num_train_epochs", "2", "--learning_rate", "1e-3", "--warmup_ratio", "0.1",
    "--lora_dropout", "0", "--lora_rank", "8", "--lora_alpha", "32",
    "--target_modules", "all-linear", "--logging_steps", "2", "--report_to", "none",
]  # fmt: skip
"""The demo's sft flags without the dataset (scripts/demo.sh)."""

B_ANSWERS = str(Path(__file__).resolve().parent / "data" / "recipe_b_base_answers.jsonl")
"""Recipe B's base answers (session 4): the first 40 builtin prompts, answered by the demo
model on llama.cpp (≤ 128 tokens, cut answers kept); a copy of the file tunesmith cached then."""

E_ANSWERS = str(Path(__file__).resolve().parent / "data" / "recipe_e_base_answers.jsonl")
"""Recipe E's base answers: 120 general prompts (the 40 builtin ones and 80 more in the eval's
instruction styles, commit 2c26b4e), answered by the demo model on llama.cpp, the 5 answers cut at
128 tokens left out (115 kept)."""

RECIPES: dict[str, list[str]] = {
    "A": ["--dataset", "self-cognition#40"],
    "B": ["--dataset", "self-cognition#40", B_ANSWERS],
    "E": ["--dataset", "self-cognition#80", E_ANSWERS, "--num_train_epochs", "1"],
    "K": ["--dataset", "self-cognition#80", B_ANSWERS, "--learning_rate", "5e-4"],
    "R": ["--dataset", "self-cognition#80", B_ANSWERS, "--learning_rate", "5e-4",
          "--retain_dataset", B_ANSWERS, "--retain_kl", "1", "--retain_ce", "0"],
}  # fmt: skip
"""Named recipes: dataset and flags on top of DEMO (later flags win). B: session 4's demo
recipe; E: 80 identity records and 115 base answers, one epoch; K: the demo's recipe since
session 5 (80 identity records, B's base answers, lr 5e-4); R: K with the base answers trained
by KL to the base model instead of cross-entropy on their text (``--retain_kl``, session 6;
give another weight after ``--``)."""


def tunesmith(args: list[str], wrap: list[str], log: Path) -> float:
    """Run ``python -m tunesmith ARGS`` (under ``wrap``), output to ``log``; wall seconds."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    start = time.monotonic()
    with log.open("w") as f:
        done = subprocess.run([*wrap, sys.executable, "-m", "tunesmith", *args], env=env,
                              stdout=f, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode:
        sys.exit(f"tunesmith {args[0]} failed ({done.returncode}); see {log}")
    return time.monotonic() - start


def summarize(run_dir: Path) -> dict:
    """The figures of one evaluated run: identity, retention and its parts, flipped items."""
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    rows = {(r["model"] == report["meta"]["base_model"], r["dataset"], r["metric"], r["subset"]):
            r["score"] for r in report["summary"]}  # fmt: skip
    out: dict = {}
    for base, tag in ((True, "base"), (False, "tuned")):
        out[tag] = {
            "id_zh": rows[(base, "identity", "acc", "zh")],
            "id_en": rows[(base, "identity", "acc", "en")],
            "ret": rows[(base, "retention", "score", "ALL")],
            "ret_zh": rows[(base, "retention", "score", "zh")],
            "ret_en": rows[(base, "retention", "score", "en")],
            "exact": rows[(base, "retention", "exact_acc", "ALL")],
            "bleu": rows[(base, "retention", "bleu-4", "ALL")],
            "rouge": rows[(base, "retention", "rouge-l", "ALL")],
        }
    out["moved"] = report["moved"]
    scores: dict[str, dict[str, float]] = {"base": {}, "tuned": {}}
    for line in (run_dir / "eval" / "answers.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["dataset"] == "retention":
            tag = "base" if r["model"] == report["meta"]["base_model"] else "tuned"
            scores[tag][r["id"]] = r["score"]
    out["items"] = scores["tuned"]
    out["base_items"] = scores["base"]
    out["flips"] = {k: v - scores["base"][k] for k, v in scores["tuned"].items()
                    if v != scores["base"][k] and v in (0.0, 100.0)}  # fmt: skip
    return out


def one_run(recipe: str, name: str, flags: list[str], seed: int, out: Path, wrap: list[str],
            backend: str) -> dict:  # fmt: skip
    """Train and eval one (recipe, seed); append its summary to ``out/runs.jsonl``."""
    label = f"{name}: {recipe}{' ' + ' '.join(flags) if flags else ''}"
    odir = out / f"{name}-s{seed}"
    args = [*DEMO, *RECIPES.get(recipe, []), *flags, "--seed", str(seed), "--output_dir", str(odir)]
    odir.mkdir(parents=True, exist_ok=True)
    trained = sorted(odir.glob("v*/checkpoint-*/adapter_config.json"))
    # A folder that holds a trained checkpoint is only evaluated (a resumed grid).
    sft_s = 0.0 if trained else tunesmith(["sft", *args], wrap, odir / "sft.log")
    run_dir = sorted(odir.glob("v*"), key=lambda p: p.stat().st_mtime)[-1]
    eval_s = tunesmith(["eval", "--adapters", str(run_dir), "--infer_backend", backend],
                       wrap, odir / "eval.log")  # fmt: skip
    logs = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    row = {"recipe": label, "seed": seed, "run_dir": str(run_dir), "sft_s": round(sft_s, 1),
           "eval_s": round(eval_s, 1), "steps": steps[-1]["step"] if steps else None,
           "train_s": steps[-1].get("elapsed_s") if steps else None,
           "final_loss": steps[-1]["loss"] if steps else None, **summarize(run_dir)}  # fmt: skip
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def on_set(r: dict) -> dict[str, float]:
    """Base and tuned figures of one run on the current builtin retention set (runs evaluated
    on a larger set are scored on the items the set keeps), from its per-item scores."""
    items = retention_items()
    out = {}
    for tag, sc in (("b", r["base_items"]), ("t", r["items"])):
        out[tag] = _mean([sc[it["id"]] for it in items])
        for lang in ("zh", "en"):
            out[f"{tag}_{lang}"] = _mean([sc[it["id"]] for it in items if it["lang"] == lang])
        out[f"{tag}_exact"] = _mean([sc[it["id"]] for it in items if it["kind"] != "open"])
        out[f"{tag}_64"] = _mean([sc[it["id"]] for it in items[:64]])
    exact = [it["id"] for it in items if it["kind"] != "open"]
    out["up"] = sum(r["items"][i] > r["base_items"][i] for i in exact)
    out["down"] = sum(r["items"][i] < r["base_items"][i] for i in exact)
    out["n"] = len(items)
    diffs = [r["items"][it["id"]] - r["base_items"][it["id"]] for it in items]
    d = _mean(diffs)
    out["se"] = (sum((x - d) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    return out


def table(out: Path) -> str:
    """A markdown table of every run in ``out/runs.jsonl``, one line per run."""
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines() if x]
    head = ("| recipe | seed | steps | identity zh / en | retention (base → tuned, Δ ± SE) "
            "| zh / en Δ | first 64 items Δ | exact acc | BLEU-4 / ROUGE-L | changed "
            "| exact items +/− |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        t, s = r["tuned"], on_set(r)
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['steps']} | {t['id_zh']:.1f} / {t['id_en']:.1f} "
            f"| {s['b']:.1f} → {s['t']:.1f}, **{s['t'] - s['b']:+.1f}** ± {s['se']:.1f} "
            f"| {s['t_zh'] - s['b_zh']:+.1f} / {s['t_en'] - s['b_en']:+.1f} "
            f"| {s['b_64']:.1f} → {s['t_64']:.1f}, {s['t_64'] - s['b_64']:+.1f} "
            f"| {s['b_exact']:.1f} → {s['t_exact']:.1f} | {t['bleu']:.1f} / {t['rouge']:.1f} "
            f"| {r['moved']['changed_pct']:.0f} % | {s['up']} / {s['down']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the (recipe, seed) grid given, or print the table of an output folder."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="B", help=f"one of {sorted(RECIPES)}, or any label")
    p.add_argument("--name", help="the runs' label and folder name (default: the recipe)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", type=Path, default=Path("bench/out/retention_seeds"))
    p.add_argument("--wrap", default="", help="command prefix for sft/eval, e.g. /work/wt/heavy")
    p.add_argument("--infer_backend", default="llamacpp")
    p.add_argument("--table", type=Path, help="print the table of this output folder and stop")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if a.table:
        print(table(a.table))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        name = a.name or a.recipe
        r = one_run(a.recipe, name, extra, seed, a.out, a.wrap.split(), a.infer_backend)
        t = r["tuned"]
        print(f"{r['recipe']} seed {seed}: identity {t['id_zh']:.1f}/{t['id_en']:.1f}, "
              f"retention {r['base']['ret']:.1f} -> {t['ret']:.1f}, flips {r['flips']}",
              flush=True)  # fmt: skip
    print(table(a.out))


if __name__ == "__main__":
    main()
