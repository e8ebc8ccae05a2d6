"""The top-level API: ``tunesmith.infer/data/export/eval`` callable whatever was imported
first (and still the subpackages), typed keyword signatures from ``tunesmith.config``, the generated
``TypedDict`` file up to date, one error type, ``progress=False``, no logging set-up, and the
new ``eval`` / ``deploy`` on the tiny model (no training here)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pydoc
import runpy
import socket
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest

import tunesmith
from tunesmith import api
from tunesmith.api import typed
from tunesmith.api.flags import default_of, flag_names
from tunesmith.cli import main
from tunesmith.config import (
    DataCommandArgs,
    DeployArgs,
    EvalArgs,
    ExportArgs,
    InferCommandArgs,
    SftArgs,
)

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "sft": SftArgs,
    "infer": InferCommandArgs,
    "infer_stream": InferCommandArgs,
    "data": DataCommandArgs,
    "export": ExportArgs,
    "eval": EvalArgs,
    "deploy": DeployArgs,
}


def python(code: str, tmp_path: Path) -> list[str]:
    """Run ``code`` in a fresh interpreter (nothing imported yet); its stdout lines."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": os.environ.get("PATH", "/usr/bin"),
           "HF_HUB_OFFLINE": "1", "TUNESMITH_CACHE": str(tmp_path / "cache")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def records(path: Path) -> Path:
    rows = [{"query": f"Echo {i}.", "response": f"{i}!"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "first",
    [
        # The subpackages first: importing them sets tunesmith.infer etc. to the modules.
        "import tunesmith.infer.engine, tunesmith.data.formats, tunesmith.export.convert, "
        "tunesmith.eval.items; import tunesmith",
        # The package first, then the subpackages, then the functions by name.
        "import tunesmith; import tunesmith.infer.engine; from tunesmith.data import formats; "
        "from tunesmith import data, eval, export, infer",
    ],
)
def test_commands_are_callable_whatever_was_imported_first(
    first: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = records(tmp_path / "d.jsonl")
    code = f"""{first}
import logging, sys
print(all(callable(getattr(tunesmith, n)) for n in {list(COMMANDS)!r} + ["load"]))
print(tunesmith.infer.engine is sys.modules["tunesmith.infer.engine"])
report = tunesmith.data(model={str(tiny_model_dir)!r}, dataset=[{str(data)!r}])
print(report.train_samples)
# The library set up no logging: the CLI does that.
print(logging.getLogger("tunesmith").handlers == [] == logging.getLogger().handlers)
"""
    assert python(code, tmp_path) == ["True", "True", "4", "True"]


def test_star_import_keeps_the_builtin_eval() -> None:
    names: dict[str, object] = {}
    exec("from tunesmith import *", names)
    assert "eval" not in names and names["infer"] is tunesmith.infer and callable(names["sft"])


def test_monkeypatch_reaches_inside_a_callable_subpackage(monkeypatch) -> None:
    import tunesmith.infer.engine as engine

    sentinel = object()
    monkeypatch.setattr("tunesmith.infer.engine.chat_messages", sentinel)
    assert engine.chat_messages is sentinel and tunesmith.infer.engine is engine
    assert callable(tunesmith.infer) and isinstance(tunesmith.infer, type(engine))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_signature_lists_every_flag_typed_with_its_default(name: str) -> None:
    cls = COMMANDS[name]
    sig = inspect.signature(getattr(tunesmith, name))
    assert sig == inspect.signature(getattr(api, name))  # the subpackage shows the function's
    if isinstance(getattr(tunesmith, name), type(tunesmith)):  # so does its __call__ (IPython)
        assert getattr(tunesmith, name).__call__ is getattr(api, name)
    kw = {n: p for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert list(kw) == [f.name for f in dataclasses.fields(cls)] + ["progress"]
    for f in dataclasses.fields(cls):
        assert kw[f.name].default == default_of(f), f.name
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    assert "Flags:" in (getattr(api, name).__doc__ or "")


def test_types_and_help_show_the_flags() -> None:
    kw = inspect.signature(tunesmith.sft).parameters
    assert kw["max_steps"].annotation is int and kw["max_steps"].default == -1
    assert kw["dataset"].annotation == list[str]
    assert kw["torch_dtype"].annotation == typing.Literal["auto", "bfloat16", "float16", "float32"]
    assert kw["eval_steps"].annotation == int | None and kw["progress"].annotation is bool
    assert (
        inspect.signature(tunesmith.infer).parameters["queries"].kind.name
        == "POSITIONAL_OR_KEYWORD"
    )
    text = pydoc.render_doc(api.sft, renderer=pydoc.plaintext)
    assert "max_steps: int = -1" in text and "learning_rate (default: 0.0001): peak" in text
    # help(tunesmith.infer) is a package's help: the function's doc, the signature via
    # inspect (Jupyter), and the package contents.
    text = pydoc.render_doc(tunesmith.infer, renderer=pydoc.plaintext)
    assert "Answer each of" in text and "max_new_tokens (default: 512)" in text
    assert "engine" in text


def test_generated_flag_types_are_up_to_date() -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "gen_api_types.py"))
    current = (ROOT / "src" / "tunesmith" / "api" / "typed.py").read_text(encoding="utf-8")
    assert current == script["render"](), "config changed: run scripts/gen_api_types.py"
    for td, cls in [(typed.SftFlags, SftArgs), (typed.InferFlags, InferCommandArgs),
                    (typed.DataFlags, DataCommandArgs), (typed.ExportFlags, ExportArgs),
                    (typed.EvalFlags, EvalArgs), (typed.DeployFlags, DeployArgs)]:  # fmt: skip
        assert set(td.__annotations__) == set(flag_names(cls))


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["eval", "--metric", "bleu"], lambda: tunesmith.eval(metric=["bleu"])),
        (["deploy", "--prot", "0"], lambda: tunesmith.deploy(prot=0)),
        (["export", "--merge_lor", "true"], lambda: tunesmith.export(merge_lor=True)),
        (["infer", "--max_new_token", "3"], lambda: tunesmith.infer(["hi"], max_new_token=3)),
        (["eval", "--metrics", "blue"], lambda: tunesmith.eval(metrics=["blue"])),
        (["deploy", "--max_concurrent", "0"], lambda: tunesmith.deploy(max_concurrent=0)),
    ],
)
def test_a_user_error_is_one_exception_with_the_clis_sentence(argv, call, capsys) -> None:
    with pytest.raises(tunesmith.UserError) as raised:
        call()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {raised.value}"


def test_progress_false_hides_every_bar(tiny_model_dir: Path, capfd) -> None:
    import transformers.utils.logging as hf_logging

    kw = {"model": str(tiny_model_dir), "infer_backend": "pt", "max_new_tokens": 2,
          "temperature": 0, "torch_dtype": "float32"}  # fmt: skip
    quiet = tunesmith.infer(["hi"], progress=False, **kw)
    assert "%|" not in capfd.readouterr().err  # no tqdm bar (weights loading included)
    assert hf_logging.is_progress_bar_enabled()  # transformers' switch is back as it was
    assert tunesmith.infer("hi", **kw) == quiet
    assert "Loading weights" in capfd.readouterr().err


def test_eval_returns_the_report_as_data(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    flags = ["--model", str(tiny_model_dir), "--eval_limit", "2", "--eval_speed", "false",
             "--torch_dtype", "float32"]  # fmt: skip
    report = tunesmith.eval(model=str(tiny_model_dir), eval_limit=2, eval_speed=False,
                            torch_dtype="float32", eval_output_dir=str(tmp_path / "py"),
                            progress=False)  # fmt: skip
    assert capsys.readouterr().out == ""  # nothing printed: .text has it
    assert {(r.dataset, r.model) for r in report.rows} == {("retention", str(tiny_model_dir))}
    assert all(r.num >= 1 and 0 <= r.score <= 100 for r in report.rows)
    assert len(report.answers) == 2 and {"response", "score"} <= set(report.answers[0])
    assert report.report_md.is_file() and report.report_json.parent == tmp_path / "py"
    assert report.moved is None and report.text.startswith(report.table)
    # The CLI on the same flags prints the same table (answers from the shared cache).
    assert main(["eval", *flags, "--eval_output_dir", str(tmp_path / "cli")]) == 0
    assert report.table in capsys.readouterr().out
    cli = json.loads((tmp_path / "cli" / "report.json").read_text("utf-8"))
    assert cli["summary"] == [dataclasses.asdict(r) for r in report.rows]


def test_deploy_serves_in_the_background_for_the_openai_client(tiny_model_dir: Path) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    with tunesmith.deploy(model=str(tiny_model_dir), served_model_name="tiny", port=0,
                          torch_dtype="float32", api_key="k", progress=False) as d:  # fmt: skip
        assert d.models == ["tiny"] and d.base_url == f"{d.url}/v1" and d.api_key == "k"
        client = openai.OpenAI(base_url=d.base_url, api_key=d.api_key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
            temperature=0,
        )  # fmt: skip
        answer = out.choices[0].message.content
    # The same greedy answer as tunesmith.infer gives.
    assert answer == tunesmith.infer("hello", model=str(tiny_model_dir), infer_backend="pt",
                                     max_new_tokens=5, temperature=0, torch_dtype="float32",
                                     progress=False)[0]  # fmt: skip
    with pytest.raises(openai.APIConnectionError):  # stopped: the port is closed
        client.models.list()
    d.stop()  # a second stop does nothing


def test_deploy_wait_serves_until_stopped(tiny_model_dir: Path) -> None:
    pytest.importorskip("fastapi")
    d = tunesmith.deploy(model=str(tiny_model_dir), port=0, progress=False)
    threading.Timer(0.5, d.stop).start()  # as Ctrl-C would, from elsewhere
    d.wait()
    assert not d.running.thread.is_alive()


def test_deploy_on_a_busy_port_fails_before_loading(tiny_model_dir: Path) -> None:
    pytest.importorskip("fastapi")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(tunesmith.UserError, match=f"--port {port}: cannot listen"):
            tunesmith.deploy(model="/nonexistent/model", port=port)


STATIC_USE = """\
import tunesmith
from tunesmith.infer.engine import chat_messages

reveal_type(tunesmith.eval(adapters=["ckpt"]).rows)
tunesmith.sft(dataset="my.jsonl", max_steps=3, torch_dtype="bfloat16")
tunesmith.infer(["hi"], max_new_token=3)
tunesmith.sft(torch_dtype="float8")
tunesmith.deploy(port="eighty")
"""


def test_type_checkers_see_the_functions_and_their_flags(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "use.py").write_text(STATIC_USE, encoding="utf-8")
    # Only tunesmith's own sources (third-party packages skipped: seconds, not minutes).
    cmd = [sys.executable, "-m", "mypy", "--no-site-packages", "--ignore-missing-imports",
           "--follow-imports=silent", "--no-incremental", "--python-version", "3.11",
           "use.py"]  # fmt: skip
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    lines = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("use.py:")]
    assert lines == [
        'note: Revealed type is "list[tunesmith.eval.score.Row]"',
        'error: Unexpected keyword argument "max_new_token" for "infer"; did you mean '
        '"max_new_tokens"?  [call-arg]',
        'note: "infer" defined in "tunesmith.api"',
        'error: Argument "torch_dtype" to "sft" has incompatible type "Literal[\'float8\']"; '
        "expected \"Literal['auto', 'bfloat16', 'float16', 'float32']\"  [arg-type]",
        'error: Argument "port" to "deploy" has incompatible type "str"; expected "int"  '
        "[arg-type]",
    ], out
