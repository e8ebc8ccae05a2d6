"""Typed arguments for every subcommand, with ms-swift's flag names.

Each dataclass is one group of flags (``groups.py``); a subcommand's arguments are the union of
a few groups (``SftArgs`` = model + template + data + train) and its own flags
(``commands.py``). Every field's help text is its docstring: it is what ``tunesmith sft
--help`` prints. ``cli.py`` turns these dataclasses into argparse parsers, merges ``--config
run.yaml`` underneath the command line, and validates.
"""

from tunesmith.config.commands import (
    DataCommandArgs,
    DeployArgs,
    EvalArgs,
    ExportArgs,
    InferCommandArgs,
    SftArgs,
    from_dict,
    to_dict,
)
from tunesmith.config.groups import (
    DataArgs,
    InferArgs,
    ModelArgs,
    TemplateArgs,
    TrainArgs,
    arg,
)

__all__ = [
    "DataArgs",
    "DataCommandArgs",
    "DeployArgs",
    "EvalArgs",
    "ExportArgs",
    "InferArgs",
    "InferCommandArgs",
    "ModelArgs",
    "SftArgs",
    "TemplateArgs",
    "TrainArgs",
    "arg",
    "from_dict",
    "to_dict",
]
