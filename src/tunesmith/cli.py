"""The ``tunesmith`` command: argument parsing and one plain function per subcommand.

Flags come from the dataclasses in ``tunesmith.config``; ``--config run.yaml`` supplies any of them
and the command line overrides it. A user mistake (bad flag, bad file, missing model) is
printed as one sentence and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from tunesmith.api.flags import check_todo, coerce, nearest, str2bool, unwrap
from tunesmith.config import (
    DataCommandArgs,
    DeployArgs,
    EvalArgs,
    ExportArgs,
    InferCommandArgs,
    SftArgs,
)
from tunesmith.utils import Interrupted, UserError, logger, reexec_with_malloc, setup_logging


def _none_or(conv: Any) -> Any:
    def parse(value: str) -> Any:
        return None if str(value).lower() in {"none", "null"} else conv(value)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _flag_spec(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    tp, optional = unwrap(tp)
    meta = f.metadata
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    spec: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    shown = "none" if default is None or default == [] else default
    if isinstance(shown, bool):
        shown = str(shown).lower()
    if isinstance(shown, list):
        shown = " ".join(map(str, shown))
    help_text = f"{meta['help']} (default: {shown})"
    if meta.get("todo"):
        help_text += " [not implemented yet]"
    spec["help"] = help_text.replace("%", "%%")
    if typing.get_origin(tp) is list:
        spec["nargs"] = "*"
        spec["metavar"] = "VALUE"
    elif tp is bool:
        spec["type"] = _none_or(str2bool) if optional else str2bool
        spec["metavar"] = "true|false"
    else:
        spec["type"] = _none_or(tp) if optional else tp
        spec["metavar"] = "|".join(meta["choices"]) if meta.get("choices") else tp.__name__.upper()
    if meta.get("choices"):
        spec["choices"] = list(meta["choices"])
    return spec


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{self.prog}: {message}")


def build_parser(cls: type, prog: str, description: str) -> _Parser:
    """An argparse parser with one ``--flag`` per dataclass field (plus its aliases)."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file supplying any flag; the command line wins"
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
        parser.add_argument(*names, **_flag_spec(f, hints[f.name]))
    return parser


def _load_yaml(path: str, cls: type) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    valid = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        key = aliases.get(key, key)
        if key not in valid:
            raise UserError(f"{path}: unknown key '{key}'{nearest(key, cls)}")
        out[key] = value
    return out


def parse_args(cls: type, prog: str, description: str, argv: list[str]) -> Any:
    """Parse ``argv`` into ``cls``: dataclass defaults < ``--config`` YAML < command line."""
    parser = build_parser(cls, prog, description)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        hint = nearest(bad, cls) if bad.startswith("-") else ""
        raise UserError(f"{prog}: unknown argument '{bad}'{hint}")
    values: dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(coerce(cls, _load_yaml(ns.config, cls), ns.config))
    values.update({k: v for k, v in vars(ns).items() if k != "config"})
    args = cls(**values)
    check_todo(args, cls)
    return args


def cmd_sft(argv: list[str]) -> int:
    """``tunesmith sft``: supervised fine-tuning (LoRA) of a chat model."""
    args = parse_args(SftArgs, "tunesmith sft", "Fine-tune a chat model on your data.", argv)
    from tunesmith.eval.base_answers import expand_base_answers
    from tunesmith.train import launch
    from tunesmith.train.strategy import parse_strategy

    # Flags are checked here once, before any worker starts (each would print the same error).
    parse_strategy(args.fsdp, args.deepspeed, args.quantization_bit)
    # Generated (or found cached) once here, before torchrun starts workers that read it.
    args = expand_base_answers(args)
    plan = None if launch.in_worker() else launch.plan_from_env()
    if plan is not None:  # NPROC_PER_NODE=N tunesmith sft …: torchrun starts N of us
        return launch.relaunch(plan, ["sft", *argv])
    from tunesmith.train.sft import sft

    run_dir = sft(args)
    logger.info(f"done: {run_dir}")
    return 0


def cmd_infer(argv: list[str]) -> int:
    """``tunesmith infer``: chat with a base model or a fine-tuned checkpoint."""
    args = parse_args(
        InferCommandArgs, "tunesmith infer", "Chat with a model or a trained adapter.", argv
    )
    from tunesmith.infer.chat import infer

    infer(args)
    return 0


def cmd_data(argv: list[str]) -> int:
    """``tunesmith data``: validate a dataset, print statistics and a rendered preview."""
    args = parse_args(
        DataCommandArgs,
        "tunesmith data",
        "Check a dataset and see exactly what the model will learn from it.",
        argv,
    )
    from tunesmith.eval.base_answers import expand_base_answers
    from tunesmith.train.data_check import data_command

    print(data_command(expand_base_answers(args)))
    return 0


def cmd_export(argv: list[str]) -> int:
    """``tunesmith export``: merge LoRA adapters, or convert to GGUF / Ollama; upload."""
    args = parse_args(
        ExportArgs,
        "tunesmith export",
        "Merge adapters into a standalone model, or convert a model to GGUF / Ollama.",
        argv,
    )
    from tunesmith.export.convert import export

    export(args)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """``tunesmith eval``: base vs tuned model on identity, retention and your data."""
    args = parse_args(EvalArgs, "tunesmith eval", "Score a model before and after tuning.", argv)
    from tunesmith.eval.run import evaluate

    evaluate(args)
    return 0


def cmd_deploy(argv: list[str]) -> int:
    """``tunesmith deploy``: an OpenAI-compatible server (many adapters) and a chat page."""
    args = parse_args(DeployArgs, "tunesmith deploy", "Serve a model and its adapters.", argv)
    from tunesmith.serve.deploy import deploy

    deploy(args)
    return 0


def cmd_estimate(argv: list[str]) -> int:
    """``tunesmith estimate``: predicted peak GPU memory and tokens/s of an sft run."""
    from tunesmith.model.estimate import EstimateArgs, estimate, load_shape, render

    args = parse_args(
        EstimateArgs, "tunesmith estimate", "Predict GPU memory and speed of a run.", argv
    )
    shape = load_shape(args)
    print(render(shape, args, estimate(shape, args)))
    return 0


COMMANDS = {
    "sft": cmd_sft,
    "infer": cmd_infer,
    "data": cmd_data,
    "export": cmd_export,
    "eval": cmd_eval,
    "deploy": cmd_deploy,
    "estimate": cmd_estimate,
}

USAGE = """usage: tunesmith COMMAND [flags]

Fine-tune open chat LLMs and put the result to work. Flag names follow ms-swift, so
`swift sft ...` works as `tunesmith sft ...`.

commands:
  sft      fine-tune a model (LoRA, or full) on your data
           tunesmith sft --model demo --dataset self-cognition --model_name 小智 --model_author 星河
  infer    chat with a model or a checkpoint
           tunesmith infer --adapters output/v0-.../checkpoint-30
  eval     score base vs tuned model: identity, retention, your data; report + table
           tunesmith eval --adapters output/v0-...
  data     check a dataset: statistics and a preview of what is trained
           tunesmith data --dataset my.jsonl --model demo
  export   merge LoRA adapters into a standalone model, or write GGUF / Ollama
           tunesmith export --adapters output/v0-.../checkpoint-30 --merge_lora true
           tunesmith export --adapters output/v0-.../checkpoint-30 --to gguf --gguf_type q8_0
  deploy   serve models and adapters over the OpenAI API, with a chat page at /
           tunesmith deploy --adapters mybot=output/v0-.../checkpoint-30
  estimate predict peak GPU memory and tokens/s of an sft run (reads config.json only)
           tunesmith estimate --model Qwen/Qwen2.5-7B-Instruct --max_length 2048

`tunesmith COMMAND --help` lists every flag of a command with its default.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tunesmith`` console script."""
    if argv is None and sys.argv[1:2] == ["sft"]:  # the process's own entry, not a caller's
        reexec_with_malloc(sys.argv[1:])  # CPU training's allocator (TUNESMITH_MALLOC=system)
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    # Deprecation notices between our dependencies (peft calling transformers) are not the
    # user's business; our own messages go through the logger.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0
    if argv[0] in {"-V", "--version"}:
        from tunesmith import __version__

        print(f"tunesmith {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(
            f"tunesmith: unknown command '{argv[0]}'{hint} (see tunesmith --help)", file=sys.stderr
        )
        return 2
    try:
        return command(argv[1:])
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":  # process 0 saved: its line names the checkpoint
            print(f"stopped: {e}", file=sys.stderr)
        return 130
    except UserError as e:
        if not _left_to_launcher(e):
            from tunesmith.train.launch import rank_prefix

            print(f"error: {rank_prefix()}{e}", file=sys.stderr)
        return 2
    except Exception as e:
        _left_to_launcher(e)  # the traceback still prints: it is this process's crash
        raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _left_to_launcher(e: BaseException) -> bool:
    """In a worker of a multi-process run: leave ``e`` for the launcher's one-line summary."""
    from tunesmith.train.launch import in_worker, record_worker_error

    return in_worker() and record_worker_error(e)


if __name__ == "__main__":
    sys.exit(main())
