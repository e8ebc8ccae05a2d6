"""The flag plumbing the CLI and the Python API share: a command's flags, given as YAML values
or keyword arguments, converted and checked against its dataclass in ``tunesmith.config``; and the
typed keyword signature every API function shows (``help``, ``inspect.signature``, Jupyter).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

from tunesmith.utils import UserError

F = TypeVar("F", bound=Callable[..., Any])

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """Parse ms-swift style booleans: ``true``/``false`` (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def unwrap(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``list[str]`` -> (list[str], False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], True
    return tp, False


def flag_names(cls: type) -> list[str]:
    """Every flag name of ``cls``, aliases included (without the dashes)."""
    names = []
    for f in dataclasses.fields(cls):
        names.append(f.name)
        names.extend(f.metadata.get("aliases", ()))
    return names


def nearest(name: str, cls: type) -> str:
    """``"; did you mean --flag?"`` for the flag of ``cls`` closest to ``name`` ("" if none)."""
    close = difflib.get_close_matches(name.lstrip("-"), flag_names(cls), n=1, cutoff=0.5)
    return f"; did you mean --{close[0]}?" if close else ""


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh list for list fields)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def coerce(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert ``--config`` YAML values or keyword arguments (strings or scalars) to the
    fields' types, and check choices; ``source`` starts each error message."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        tp, optional = unwrap(hints[key])
        try:
            if value is None and optional:
                out[key] = None
            elif typing.get_origin(tp) is list:
                out[key] = (
                    [str(v) for v in value] if isinstance(value, list) else str(value).split()
                )
            elif tp is bool:
                out[key] = str2bool(value)
            elif tp is int and (
                isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
            ):
                raise ValueError(f"expected a whole number, got {value!r}")
            else:
                out[key] = tp(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{source}: {key}: {e}") from None
        choices = fields[key].metadata.get("choices")
        if choices and out[key] not in choices:
            raise UserError(f"{source}: {key}: expected one of {', '.join(choices)}")
    return out


def check_todo(args: Any, cls: type) -> None:
    """Refuse flags that are accepted for compatibility but not implemented yet."""
    for f in dataclasses.fields(cls):
        todo = f.metadata.get("todo")
        if todo and getattr(args, f.name) != default_of(f):
            raise UserError(
                f"--{f.name} is not implemented yet in this version of tunesmith (planned: "
                f"{todo}); remove it to continue"
            )


def make_args(cls: type, prog: str, values: dict[str, Any]) -> Any:
    """``cls`` from keyword arguments named like the flags (aliases too), converted and
    checked as a ``--config`` file is: unknown names, types, choices, not-yet-implemented."""
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    valid = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    named: dict[str, Any] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in valid:
            raise UserError(f"{prog}: unknown argument '--{key}'{nearest(key, cls)}")
        if typing.get_origin(unwrap(hints[name])[0]) is list:
            # One path is one item (a YAML string is split on spaces; a Python one is not).
            if isinstance(value, str | os.PathLike):
                value = [value]
            elif isinstance(value, tuple):
                value = list(value)
        named[name] = value
    args = cls(**coerce(cls, named, prog))
    check_todo(args, cls)
    return args


def annotation(f: dataclasses.Field, hint: Any) -> Any:
    """The type a keyword argument shows: the field's, with its choices as a ``Literal``."""
    choices = f.metadata.get("choices")
    if not choices:
        return hint
    optional = unwrap(hint)[1]
    lit = Literal[tuple(choices)]  # type: ignore[valid-type]
    return lit | None if optional else lit


def keywords(cls: type) -> list[inspect.Parameter]:
    """One keyword-only parameter per flag of ``cls``: its type, its default."""
    hints = typing.get_type_hints(cls)
    return [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(f),
                          annotation=annotation(f, hints[f.name]))
        for f in dataclasses.fields(cls)
    ]  # fmt: skip


def flag_help(cls: type) -> str:
    """One line per flag of ``cls`` (name, default, help), as ``tunesmith CMD --help``."""
    lines = []
    for f in dataclasses.fields(cls):
        default = default_of(f)
        shown = "none" if default is None or default == [] else default
        lines.append(f"    {f.name} (default: {shown}): {f.metadata['help']}")
    return "\n".join(lines)


def resolved(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature with its string annotations (``from __future__ import annotations``)
    evaluated where they can be, so ``help`` shows ``bool``, not ``'bool'``; ``**flags:
    Unpack[...]`` names a type that exists for type checkers only and stays text."""

    def value(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        try:
            return eval(text, fn.__globals__)  # what typing.get_type_hints does, per annotation
        except NameError:
            return text

    sig = inspect.signature(fn)
    params = [p.replace(annotation=value(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=value(sig.return_annotation))


def takes(cls: type) -> Callable[[F], F]:
    """Give an API function ``fn(..., **flags)`` the flags of ``cls`` as its visible signature.

    ``**flags`` stays the function's real parameter (one code path: ``make_args`` converts and
    checks them exactly as the CLI does); ``__signature__`` replaces it with one typed,
    defaulted keyword per flag, which ``help()``, ``inspect.signature`` and Jupyter show, and
    the docstring gains the flags' help. Static tools read ``**flags: Unpack[...Flags]``.
    """

    def wrap(fn: F) -> F:
        own = resolved(fn)
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first = [p for p in params if p.kind is not p.KEYWORD_ONLY]
        extra = [p for p in params if p.kind is p.KEYWORD_ONLY]
        fn.__signature__ = own.replace(parameters=[*first, *keywords(cls), *extra])  # type: ignore[attr-defined]
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nFlags:\n{flag_help(cls)}"
        return fn

    return wrap


@contextlib.contextmanager
def bars(progress: bool) -> Iterator[None]:
    """With ``progress=False``, also silence the progress bars of transformers (loading and
    saving weights) and huggingface_hub (downloads) for the duration; restored afterwards.

    tunesmith's own bars take ``progress`` directly; these two libraries only offer a
    process-wide switch, so it is flipped here and only when asked for.
    """
    if progress:
        yield
        return
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf_logging

    was_on, hub_off = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if not hub_off:
            hub.enable_progress_bars()
