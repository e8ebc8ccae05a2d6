"""tunesmith: fine-tune open chat LLMs and put the result to work.

From Python, every command is a function here, taking the command's flags as typed keyword
arguments: ``tunesmith.sft``, ``infer`` (and ``infer_stream``), ``eval``, ``export``,
``data``, ``deploy``, plus ``load`` (a checkpoint for transformers); they return ``Run``,
answers, ``EvalReport``, the written path, ``DataReport``, ``Deployment``. A user mistake
raises ``tunesmith.UserError`` with the sentence the CLI prints. See :mod:`tunesmith.api`.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# `infer`, `data`, `export` and `eval` are both commands and subpackages (DESIGN.md's layout).
# Python's import system sets the attribute `tunesmith.infer` to the subpackage whenever
# `tunesmith.infer.engine` (or anything inside it) is imported, so a function of that name here
# would be replaced by the module, depending on what was imported before. Renaming the
# subpackages would churn every import in the project; instead each of these subpackages is
# imported here, first, and made callable: its module object gets a `types.ModuleType`
# subclass with `__call__` (the documented way to customise a module: "setting __class__",
# Python reference, data model, "Customizing module attribute access"). `tunesmith.infer(...)`
# then calls `tunesmith.api.infer` whatever was imported before, while `tunesmith.infer.engine`,
# `from tunesmith.infer import chat` and pytest's `monkeypatch.setattr("tunesmith.infer.engine
# .X", ...)` keep working: it is the same module object. The subpackages' `__init__` files hold
# only a docstring, so this imports nothing heavy (no torch).
if TYPE_CHECKING:
    # Type checkers and IDEs see the functions (with their typed flags), not the subpackages.
    from tunesmith.api import (
        DataReport,
        Deployment,
        EvalReport,
        Interrupted,
        Run,
        UserError,
        data,
        deploy,
        export,
        infer,
        infer_stream,
        load,
        sft,
    )
    from tunesmith.api import eval as eval  # re-exported, though not by `import *` (below)
else:
    from tunesmith import data, eval, export, infer


def _command(module: types.ModuleType) -> Any:
    """The API function a command subpackage stands for."""
    from tunesmith import api

    return {
        "tunesmith.data": api.data,
        "tunesmith.eval": api.eval,
        "tunesmith.export": api.export,
        "tunesmith.infer": api.infer,
    }[module.__name__]


class _CommandPackage(types.ModuleType):
    # A subpackage that is also its command's function (no class docstring: ``__doc__`` is a
    # property here, the function's help followed by the package's own docstring).

    # `tunesmith.infer(...)` looks `__call__` up on this class and, a property, gets the API
    # function itself: so `tunesmith.infer.__call__` is that function too, and IPython's
    # "Call signature" shows its flags (not a wrapper's `*args, **kwargs`).
    @property
    def __call__(self) -> Any:
        return _command(self)

    @property
    def __signature__(self) -> Any:  # what inspect.signature, help() and Jupyter show
        import inspect

        return inspect.signature(_command(self))

    @property  # type: ignore[override]
    def __doc__(self) -> str:  # type: ignore[override]
        fn = _command(self)
        package = self.__dict__.get("__doc__") or ""
        return f"{fn.__doc__}\n\nThe subpackage {self.__name__}: {package}"


if not TYPE_CHECKING:
    for _package in (data, eval, export, infer):
        _package.__class__ = _CommandPackage
    del _package

# Not "eval": `from tunesmith import *` must not hide the builtin eval (tunesmith.eval works).
__all__ = [
    "DataReport",
    "Deployment",
    "EvalReport",
    "Interrupted",
    "Run",
    "UserError",
    "data",
    "deploy",
    "export",
    "infer",
    "infer_stream",
    "load",
    "sft",
]


def __getattr__(name: str) -> Any:
    """The Python API's other functions and types, imported on first access (so that
    `import tunesmith` does not import torch)."""
    if name in __all__ or name == "eval":
        from tunesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included (tab completion)."""
    return sorted({*globals(), *__all__})
