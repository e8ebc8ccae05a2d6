"""The Python API on the tiny random model: each command as a function of ``tunesmith``
(``tunesmith.sft``, ``tunesmith.infer``, …; the same as ``tunesmith.api``'s)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith
from tunesmith import api
from tunesmith.api.flags import make_args
from tunesmith.config import SftArgs

ROOT = Path(__file__).resolve().parents[2]


def write_data(path: Path, n: int = 8) -> Path:
    rows = [{"instruction": f"Echo {i}.", "output": f"{i}!"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_import_tunesmith_stays_light() -> None:
    code = "import sys, tunesmith; print('torch' in sys.modules, callable(tunesmith.sft))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin"})  # fmt: skip
    # Before a function is touched torch is not imported; touching sft loads only the API.
    assert out.stdout.split()[0] == "False"
    assert tunesmith.UserError is api.UserError and tunesmith.Interrupted is api.Interrupted


def test_unknown_keyword_is_the_clis_sentence_with_the_nearest_flag(capsys) -> None:
    from tunesmith.cli import main

    expected = "tunesmith sft: unknown argument '--max_step'; did you mean --max_steps?"
    with pytest.raises(tunesmith.UserError) as raised:
        tunesmith.sft(max_step=3)
    assert str(raised.value) == expected
    assert main(["sft", "--max_step", "3"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"


def test_choices_types_and_strategy_are_checked_as_in_the_cli() -> None:
    with pytest.raises(api.UserError, match="torch_dtype: expected one of auto"):
        tunesmith.sft(torch_dtype="float8")
    with pytest.raises(api.UserError, match="max_steps"):
        tunesmith.sft(max_steps="many")
    # The CLI's strategy check, before anything is loaded or written.
    with pytest.raises(api.UserError, match=r"--deepspeed ds\.json: expected zero2, zero3"):
        tunesmith.sft(deepspeed="ds.json")
    args = make_args(SftArgs, "tunesmith sft", {"dataset": "a.jsonl", "tuner_type": "full"})
    assert args.dataset == ["a.jsonl"] and args.train_type == "full"
    args = make_args(SftArgs, "tunesmith sft", {"dataset": Path("my data.jsonl")})
    assert args.dataset == ["my data.jsonl"]  # one path, spaces and all
    assert args.max_steps == -1  # the CLI's default


def test_data_returns_the_report_as_numbers_and_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = write_data(tmp_path / "d.jsonl")
    report = tunesmith.data(model=str(tiny_model_dir), dataset=[str(path)], max_length=64)
    assert report.train_samples == 8 and report.val_samples == 0
    assert len(report.lengths) == 8 and 0 < report.trained_tokens < sum(report.lengths)
    assert report.by_source[str(path)]["records"] == 8
    assert report.dropped == {"deleted": 0, "truncated": 0, "no_labels": 0}
    assert "samples: 8 train" in report.text and "[[" in report.text  # no terminal colours
    with pytest.raises(api.UserError, match="no training data"):
        tunesmith.data(model=str(tiny_model_dir))


@pytest.fixture(scope="module")
def run(isolated_torch, tiny_model_dir: Path, tmp_path_factory) -> api.Run:
    work = tmp_path_factory.mktemp("api")
    return tunesmith.sft(model=str(tiny_model_dir), dataset=[str(write_data(work / "d.jsonl"))],
                         val_dataset=[str(write_data(work / "v.jsonl", 2))], max_steps=4,
                         eval_steps=2, save_steps=2, logging_steps=1, learning_rate=5e-3,
                         torch_dtype="float32", report_to="none", output_dir=str(work / "out"),
                         system="Be terse.", progress=False)  # fmt: skip


@pytest.mark.slow
def test_sft_returns_the_run(run: api.Run) -> None:
    assert run.run_dir.is_dir() and run.last_checkpoint == run.run_dir / "checkpoint-4"
    assert run.best_checkpoint in {run.run_dir / "checkpoint-2", run.run_dir / "checkpoint-4"}
    steps = [r["step"] for r in run.history if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert run.metrics["loss"] == [r for r in run.history if "loss" in r][-1]["loss"]
    assert "eval_loss" in run.metrics
    # The best checkpoint is the one with the lowest logged eval_loss.
    evals = [r for r in run.history if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert run.best_checkpoint == run.run_dir / f"checkpoint-{best['step']}"


@pytest.mark.slow
def test_infer_and_stream_answer_from_the_checkpoint(run: api.Run) -> None:
    kw = {"adapters": [str(run.last_checkpoint)], "max_new_tokens": 6, "temperature": 0}
    answers = tunesmith.infer(["Echo 1.", "Echo 2."], **kw)
    assert (
        isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    )
    pieces = list(tunesmith.infer_stream("Echo 1.", **kw))
    assert "".join(pieces).strip() == answers[0].strip()


@pytest.mark.slow
def test_infer_batch_writes_the_result_file(run: api.Run, tmp_path: Path) -> None:
    out = tunesmith.infer(adapters=[str(run.last_checkpoint)], max_new_tokens=4, temperature=0,
                    val_dataset=[str(write_data(tmp_path / "q.jsonl", 3))],
                    result_path=str(tmp_path / "r.jsonl"), progress=False)  # fmt: skip
    assert out == tmp_path / "r.jsonl" and len(out.read_text().splitlines()) == 3


@pytest.mark.slow
@pytest.mark.parametrize("merge", [False, True])
def test_load_gives_a_model_for_a_transformers_pipeline(run: api.Run, merge: bool) -> None:
    from transformers import pipeline

    model, tokenizer = tunesmith.load(run.run_dir, merge=merge)
    assert hasattr(model, "merge_and_unload") is not merge
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    # The run's system prompt (args.json) is what tunesmith's own engine uses too.
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Echo 1."}]
    out = chat(messages, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    # The same greedy answer as `tunesmith infer` gives for this checkpoint.
    ours = api.infer(
        ["Echo 1."], adapters=[str(run.last_checkpoint)], max_new_tokens=5, temperature=0
    )
    assert out[0]["generated_text"][-1]["content"] == ours[0]


@pytest.mark.slow
def test_export_returns_the_merged_directory(run: api.Run, tmp_path: Path) -> None:
    out = tunesmith.export(adapters=[str(run.last_checkpoint)], merge_lora=True,
                     output_dir=str(tmp_path / "merged"))  # fmt: skip
    assert out == tmp_path / "merged" and (out / "config.json").is_file()


@pytest.mark.slow
def test_seed002_example_runs_on_the_tiny_model(isolated_torch, tiny_model_dir, tmp_path) -> None:
    module = runpy.run_path(str(ROOT / "examples" / "seed002_style.py"))
    answer = module["main"](["--model", str(tiny_model_dir), "--max_steps", "2",
                             "--output_dir", str(tmp_path)])  # fmt: skip
    assert isinstance(answer, str)
    assert len(list((tmp_path / "output").glob("v*/checkpoint-2"))) == 1


@pytest.mark.slow
def test_load_a_full_fine_tuning_run(isolated_torch, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    run = tunesmith.sft(model=str(tiny_model_dir), dataset=[str(write_data(tmp_path / "d.jsonl"))],
                        train_type="full", max_steps=2, torch_dtype="float32", report_to="none",
                        output_dir=str(tmp_path / "out"), progress=False)  # fmt: skip
    assert run.last_checkpoint == run.run_dir / "checkpoint-2" and run.best_checkpoint is None
    model, tokenizer = tunesmith.load(run.run_dir)
    assert not hasattr(model, "merge_and_unload")  # a whole model, no adapter
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        [{"role": "user", "content": "Echo 1."}], max_new_tokens=3, do_sample=False
    )
    assert out[0]["generated_text"][-1]["role"] == "assistant"


@pytest.mark.slow
def test_eval_scores_the_run_against_its_base(run: api.Run, tmp_path: Path) -> None:
    report = tunesmith.eval(adapters=[str(run.run_dir)], model_name=["小智", "XiaoZhi"],
                            eval_limit=2, eval_speed=False, eval_output_dir=str(tmp_path / "r"),
                            progress=False)  # fmt: skip
    models = list(dict.fromkeys(r.model for r in report.rows))
    ckpt = run.best_checkpoint or run.last_checkpoint
    assert models == [str(report.meta["base_model"]), f"{run.run_dir.name}/{ckpt.name}"]
    assert {r.dataset for r in report.rows} == {"identity", "retention"}
    assert len(report.answers) == 2 * (2 + 2) and report.moved is not None
    assert report.meta["system"] == "Be terse." and "identity" in report.table


@pytest.mark.slow
def test_deploy_serves_the_adapter_as_infer_answers(run: api.Run, tiny_model_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    ckpt = str(run.last_checkpoint)
    with tunesmith.deploy(adapters=[f"echo={ckpt}"], port=0, progress=False) as d:
        assert d.models[1:] == ["echo"]
        client = openai.OpenAI(base_url=d.base_url, api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "Echo 1."}], max_tokens=6,
            temperature=0,
        )  # fmt: skip
    ours = tunesmith.infer("Echo 1.", adapters=[ckpt], infer_backend="pt", max_new_tokens=6,
                           temperature=0, progress=False)  # fmt: skip
    assert out.choices[0].message.content == ours[0]
