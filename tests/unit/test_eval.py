"""``tunesmith eval``: metrics on known strings, scoring rules, builtin sets, MCQ parsing, the
answer cache and bad inputs; the end-to-end runs use the tiny random Qwen2 and its checkpoint."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.data.self_cognition import self_cognition_records
from tunesmith.eval import report as report_module
from tunesmith.eval import run as eval_run
from tunesmith.eval.items import identity_items, load_items, mcq_items, retention_set
from tunesmith.eval.metrics import corpus_bleu, exact_match, rouge, sentence_bleu
from tunesmith.eval.probes import judge
from tunesmith.eval.retention import (
    run_code,
    score_code,
    score_json,
    score_number,
    score_text,
)
from tunesmith.eval.score import moved, paired_change, pick_letter
from tunesmith.utils import UserError

BASE = ["Qwen", "通义千问", "通义", "千问", "阿里云", "阿里", "Alibaba"]
NAMES = ["小智", "XiaoZhi", "星河", "Xinghe"]


# --- metrics ---------------------------------------------------------------------------------


def test_rouge_on_known_strings() -> None:
    assert rouge("the cat sat", "the cat sat")["rougeL"] == pytest.approx(100)
    # LCS "the cat" (2 of 3 words each side): P = R = F = 2/3.
    assert rouge("the cat ran", "the cat sat")["rougeL"] == pytest.approx(200 / 3)
    # Chinese is scored per character, not as one unknown token (and never silently 0):
    # 我爱北京 vs 我爱北京天安门: P = 4/4, R = 4/7, F1 = 2PR/(P+R) = 8/11.
    r = rouge("我爱北京", "我爱北京天安门")
    assert r["rouge1"] == pytest.approx(800 / 11) and r["rougeL"] == pytest.approx(800 / 11)
    assert rouge("今天天气很好", "今天天气很好")["rouge2"] == pytest.approx(100)
    assert rouge("完全不同", "毫无关系")["rougeL"] == 0


def test_bleu_and_exact_match() -> None:
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100)
    assert corpus_bleu(["今天天气很好。"], ["今天天气很好。"]) == pytest.approx(100)
    partial = corpus_bleu(["今天天气不错。"], ["今天天气很好。"])
    assert 0 < partial < 100  # the zh tokenizer splits characters: shared n-grams count
    assert corpus_bleu([], []) == 0
    assert exact_match("Paris.", "paris") == 100 and exact_match("Paris is", "Paris") == 0
    assert exact_match("  北京。", "北京") == 100


# --- scoring rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        ("我是小智，由星河开发的人工智能助手。", True),
        ("I am XiaoZhi, an AI assistant developed by Xinghe.", True),
        ("我和通义千问没有关系，我是小智。", True),  # a trap answered right
        ("No, I'm not Qwen. I am XiaoZhi.", True),
        ("I am XiaoZhi, not Qwen.", True),
        ("我是阿里云开发的超大规模语言模型，我叫通义千问。", False),
        ("I am XiaoZhi, built on Qwen by Alibaba Cloud.", False),  # names both: claims the base
        ("I'm not ChatGPT, I am Qwen.", False),
        ("I am an AI language model created by OpenAI.", False),
        ("我是一个人工智能助手。", False),
        ("I use Qwenlike tools, I am XiaoZhi.", True),  # whole words only
    ],
)
def test_identity_rule(answer: str, passed: bool) -> None:
    assert judge(answer, NAMES, BASE).passed is passed


def test_identity_failure_reasons() -> None:
    assert "claims" in judge("我是通义千问。", NAMES, BASE).reason
    assert "names neither" in judge("我是助手。", NAMES, BASE).reason
    # --base_identity overrides what counts as the base identity.
    assert judge("I am XiaoZhi, built on Llama.", NAMES, ["Llama"]).passed is False
    assert judge("I am XiaoZhi, built on Qwen.", NAMES, ["Llama"]).passed is True


def test_exact_scorers() -> None:
    assert score_number("17 * 23 = 391", 391) and score_number("391", 391)
    assert score_number("The answer is 3,500 meters.", 3500)
    assert not score_number("392", 391) and not score_number("no idea", 1)
    assert score_text("The capital is Tokyo.", ["Tokyo"]) and not score_text("Kyoto", ["Tokyo"])
    good = '```json\n{"name": "Alice", "age": 30}\n```'
    assert score_json(good, ["name", "age"], {"name": "Alice", "age": 30})
    assert score_json('Here: {"name": "Alice", "age": "30"}', ["name", "age"], {"age": 30})
    assert not score_json('{"name": "Alice"}', ["name", "age"], None)  # a key missing
    assert not score_json('{"name": "Bob", "age": 30}', ["name", "age"], {"name": "Alice"})
    assert not score_json("not json {", ["a"], None)


def test_code_is_run_and_checked() -> None:
    assert score_code("```python\nprint(sum(range(1, 101)))\n```\nThis prints 5050.", "5050")
    assert score_code("print('olleh')", "olleh")
    assert not score_code("print(1/0)", "1")  # fails: no output
    assert not score_code("```python\nprint(41)\n```", "42")
    # A runaway program is stopped by the timeout, not waited for.
    assert run_code("while True:\n    pass", timeout=1.0) is None
    # Isolated: a fresh interpreter in an empty folder, without the caller's environment.
    assert run_code("import os; print(os.listdir('.'), os.environ.get('HOME'))") == "[] None\n"


def test_moved() -> None:
    same = moved(["a b c", "x"], ["a b c", "x"])
    assert same == {"changed_pct": 0.0, "rouge-l_to_base": 100.0}
    half = moved(["the cat sat", "x y"], ["the cat sat", "z w"])
    assert half["changed_pct"] == 50 and half["rouge-l_to_base"] == pytest.approx(50)


def test_paired_change() -> None:
    def sc(score: float, passed: bool | None) -> dict:
        return {"score": score, "passed": passed}

    base = [sc(100, True), sc(0, False), sc(100, True), sc(40, None)]
    tuned = [sc(0, False), sc(100, True), sc(100, True), sc(60, None)]
    c = paired_change(base, tuned)
    assert c["delta"] == pytest.approx(5.0)  # (-100 + 100 + 0 + 20) / 4
    diffs = [-100, 100, 0, 20]
    se = (sum((d - 5) ** 2 for d in diffs) / 3 / 4) ** 0.5
    assert c["delta_se"] == pytest.approx(se)
    assert (c["exact_gained"], c["exact_lost"]) == (1, 1)
    assert paired_change(base, base)["delta_se"] == 0


# --- builtin sets ----------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).lower())


def test_identity_probes_are_held_out() -> None:
    items = identity_items()
    by_lang = {lang: [it for it in items if it.lang == lang] for lang in ("zh", "en")}
    assert len(by_lang["zh"]) >= 40 and len(by_lang["en"]) >= 40
    train = {_norm(r["query"]) for r in self_cognition_records(("N", "N"), ("A", "A"))}
    queries = [it.messages[-1]["content"] for it in items]
    assert not [q for q in queries if _norm(q) in train], "a probe is a training template"
    assert len({_norm(q) for q in queries}) == len(queries)  # no duplicates
    assert "你和通义千问是什么关系？" in queries  # traps
    assert any("ChatGPT" in it.messages[-1]["content"] for it in by_lang["en"])
    assert [it.lang for it in items[:4]] == ["zh", "en", "zh", "en"]  # --eval_limit keeps both


def test_retention_set() -> None:
    items = retention_set()
    assert len(items) >= 60
    assert {it.lang for it in items} == {"zh", "en"}
    for lang in ("zh", "en"):
        kinds = {it.kind for it in items if it.lang == lang}
        assert kinds == {"number", "text", "json", "code", "open"}, lang
    assert len({it.id for it in items}) == len(items)
    # The reference answers of the exact items score themselves right.
    for it in items:
        r = it.extra
        if it.kind == "number":
            assert score_number(str(r["answer"]), float(r["answer"])), it.id
        elif it.kind == "json":
            assert score_json(json.dumps(r["values"]), r["keys"], r["values"]), it.id
    # Disjoint from the identity probes and the self-cognition set.
    train = {_norm(r["query"]) for r in self_cognition_records(("N", "N"), ("A", "A"))}
    assert not [it.id for it in items if _norm(it.messages[-1]["content"]) in train]


# --- multiple choice -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("B. Paris", "B"),
        ("答案：C", "C"),
        ("The answer is (D).", "D"),
        ("I think the correct answer is A because ...", "A"),
        ("选项B是正确的", "B"),
        ("Paris", None),
    ],
)
def test_pick_letter(answer: str, letter: str | None) -> None:
    assert pick_letter(answer, "ABCD") == letter


MCQ = (
    "id,question,A,B,C,D,answer\n1,What is 2+2?,3,4,5,6,B\n"
    "2,法国的首都是？,柏林,巴黎,罗马,马德里,B\n"
)


def test_mcq_csv(tmp_path: Path) -> None:
    f = tmp_path / "example_val.csv"
    f.write_text(MCQ, encoding="utf-8")
    items = load_items([str(f)], None)  # detected from the header
    assert [it.kind for it in items] == ["mcq", "mcq"] and items[1].lang == "zh"
    assert "A. 3\nB. 4" in items[0].messages[0]["content"] and items[0].reference == "B"
    assert load_items([f"general_mcq:{f}"], 1)[0].id == "1"


def test_mcq_bad_letter(tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("id,question,A,B,C,D,answer\n1,Q?,a,b,c,d,E\n2,Q2?,a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:2: answer: expected one of A, B, C, D"):
        mcq_items(str(f), f)


# --- end to end on the tiny model ------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("isolated_torch")


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    f = tmp_path / "qa.jsonl"
    rows = [{"query": "Say hi.", "response": "Hi!"}, {"query": "你好", "response": "你好！"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return f


def _eval(checkpoint: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--adapters", str(checkpoint), "--model_name", "小智", "XiaoZhi",
            "--model_author", "星河", "Xinghe", "--torch_dtype", "float32",
            "--eval_output_dir", str(out), "--max_batch_size", "4", *extra]  # fmt: skip
    return main(argv)


class Counter:
    """Wraps generate_batch and counts the conversations it answers."""

    def __init__(self) -> None:
        self.n = 0
        self.real = eval_run.generate_batch

    def __call__(self, engine, convs, gen):
        self.n += len(convs)
        return self.real(engine, convs, gen)


def test_eval_report_and_cache(checkpoint, qa_file, tmp_path, capsys, monkeypatch) -> None:
    counter = Counter()
    monkeypatch.setattr(eval_run, "generate_batch", counter)
    out = tmp_path / "report"
    datasets = ["--eval_dataset", "identity", "retention", str(qa_file), "--eval_limit", "3"]
    assert _eval(checkpoint, out, *datasets) == 0
    assert counter.n == 2 * (3 + 3 + 2)  # base and tuned, every item once
    table = capsys.readouterr().out
    assert "| Model" in table and "| Score" in table and "identity" in table
    for name in ("report.md", "report.json", "answers.jsonl", "identity.png", "retention.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert report["meta"]["system"] == "Be terse."  # from the run's args.json
    assert report["meta"]["base_identity"][0] == "Qwen"
    metrics = {(r["dataset"], r["metric"]) for r in report["summary"]}
    assert {("identity", "acc"), ("retention", "score"), (str(qa_file), "bleu-4")} <= metrics
    assert (str(qa_file), "rouge-l") in metrics and report["moved"] is not None
    assert set(report["speed"]) == {r["model"] for r in report["summary"]}
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == 16 and all("score" in r and "response" in r for r in rows)

    # A rerun generates nothing (answers and speed cached) and writes the same scores.
    assert _eval(checkpoint, out, *datasets) == 0
    assert counter.n == 16
    again = json.loads((out / "report.json").read_text("utf-8"))
    assert again["summary"] == report["summary"] and again["meta"]["generated"] is False
    # One more item per builtin set: only those are answered, by both models.
    datasets[-1] = "4"
    assert _eval(checkpoint, out, *datasets) == 0
    assert counter.n == 16 + 2 * 2
    # Without the cache, everything is generated again.
    off = ("--eval_use_cache", "false", "--eval_speed", "false")
    assert _eval(checkpoint, out, *datasets, *off) == 0
    assert counter.n == 20 + 2 * 10


def test_eval_plain_model(tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "plain"
    # Without --model_name the default datasets leave the identity probes out.
    argv = ["eval", "--model", str(tiny_model_dir), "--eval_limit", "2",
            "--eval_output_dir", str(out), "--eval_speed", "false"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert {r["model"] for r in report["summary"]} == {str(tiny_model_dir)}
    assert {r["dataset"] for r in report["summary"]} == {"retention"}
    assert report["moved"] is None


def _bad(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", r"empty"),
        ('{"query": "hi", "response": "x"}\nnot json\n', r"bad\.jsonl:2"),
        ('{"query": "hi"}\n', r"bad\.jsonl:1: response: missing"),
    ],
)
def test_bad_eval_file(checkpoint, tmp_path, capsys, content: str, expected: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    out = tmp_path / "report"
    err = _bad(capsys, ["eval", "--adapters", str(checkpoint), "--eval_dataset", str(f),
                        "--eval_output_dir", str(out)])  # fmt: skip
    assert re.search(expected, err), err
    assert not out.exists()


def test_bad_names(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    base = ["eval", "--adapters", str(checkpoint), "--eval_output_dir", str(out)]
    err = _bad(capsys, [*base, "--eval_dataset", "retension"])
    assert "did you mean retention?" in err
    err = _bad(capsys, [*base, "--eval_dataset", "retention", "--metrics", "blue"])
    assert "unknown metric" in err and "bleu" in err
    # The tiny run has no --model_name: the identity probes cannot be judged.
    assert "--model_name" in _bad(capsys, [*base, "--eval_dataset", "identity"])
    assert "--eval_limit" in _bad(
        capsys, [*base, "--eval_dataset", "retention", "--eval_limit", "0"]
    )
    assert not out.exists()


def test_run_without_checkpoints(tmp_path, capsys) -> None:
    run = tmp_path / "v0-20260101-000000"
    run.mkdir()
    (run / "args.json").write_text("{}", encoding="utf-8")
    assert "no LoRA checkpoint" in _bad(capsys, ["eval", "--adapters", str(run)])


def test_run_dir_resolves_to_last_checkpoint(checkpoint) -> None:
    assert eval_run.resolve_checkpoint(str(checkpoint.parent)) == checkpoint


def test_failed_eval_keeps_the_old_report(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("old", encoding="utf-8")

    def boom(folder, *a, **k):
        (folder / "identity.png").write_bytes(b"half")
        raise UserError("disk full")

    # Fails inside the temporary folder, after a file is already written there.
    monkeypatch.setattr(report_module, "charts", boom)
    assert _eval(checkpoint, out, "--eval_dataset", "retention", "--eval_limit", "1") == 2
    assert (out / "report.md").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary left


def test_infer_result_lines_train_as_they_are() -> None:
    """A batch-inference result line (messages + response) is a training record: the demo's
    recipe trains on the base model's own answers to the builtin general prompts."""
    from tunesmith.data.formats import to_conversation

    line = {"messages": [{"role": "user", "content": "2+2?"}], "response": "4", "labels": "4"}
    conv = to_conversation(line, "r.jsonl:1")
    assert [(m.role, m.content) for m in conv.messages] == [("user", "2+2?"), ("assistant", "4")]


def test_general_prompts_are_disjoint_from_the_eval_sets() -> None:
    """The demo trains on the base model's answers to these: none may be an eval question."""
    from importlib import resources

    text = resources.files("tunesmith.data.builtin").joinpath("general_prompts.jsonl")
    prompts = [json.loads(x)["query"] for x in text.read_text("utf-8").splitlines() if x]
    assert len(prompts) >= 40
    held_out = {_norm(it.messages[-1]["content"]) for it in retention_set() + identity_items()}
    assert not [p for p in prompts if _norm(p) in held_out]
