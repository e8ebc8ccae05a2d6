"""tunesmith: fine-tune open chat LLMs and put the result to work.

From Python: ``tunesmith.sft(...)``, ``tunesmith.load(...)``, ``tunesmith.Run`` and
``tunesmith.UserError`` here; every command (``sft``, ``infer``, ``infer_stream``, ``data``,
``export``, ``load``) in :mod:`tunesmith.api`. ``infer``, ``data`` and ``export`` are also the
names of subpackages, so import them from ``tunesmith.api``.
"""

from typing import Any

__version__ = "0.1.0"

# Loaded on first use (module __getattr__): `import tunesmith` does not import torch.
_API = ("sft", "load", "infer_stream", "Run", "DataReport", "UserError", "Interrupted")


def __getattr__(name: str) -> Any:
    """The Python API's functions, imported on first access."""
    if name in _API:
        from tunesmith import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
