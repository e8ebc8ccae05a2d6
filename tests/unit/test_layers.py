"""Imports only point downwards: ``cli > serve > eval > train, infer, export > data, model >
config > utils``; no module imports a sibling package of its own layer or anything above it.

Every import statement is checked, those inside functions too (the lazy ones are still
dependencies).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunesmith

SRC = Path(tunesmith.__file__).resolve().parent

# Each part of the package (a subpackage or a top-level module) and its layer; a part may
# import itself and any part of a lower layer, nothing else. `eval` reuses infer's batch
# inference; `serve` exposes infer and eval over HTTP.
LAYERS: dict[str, int] = {
    "__main__": 9,
    "cli": 8,
    "api": 7,  # tunesmith.sft() etc.: the commands as Python functions, below the CLI
    "serve": 6,
    "eval": 5,
    "train": 4,
    "infer": 4,
    "export": 4,
    "data": 3,
    "model": 3,
    "config": 2,
    "options": 2,  # the typed options built from config's flag dataclasses
    "utils": 1,
    "": 0,  # the package itself (tunesmith/__init__.py: the version)
}
# Parts of one layer that may import each other, importer -> imported.
SAME_LAYER_ALLOWED = {("options", "config")}
# The package re-exports the Python API lazily (module __getattr__), so `import tunesmith`
# stays light; that one import points upwards by design.
SAME_LAYER_ALLOWED.add(("", "api"))
# The command subpackages are imported by the package to be made callable (tunesmith.infer(...)
# is tunesmith.api.infer; see tunesmith/__init__.py): their __init__ files import nothing.
SAME_LAYER_ALLOWED |= {("", "data"), ("", "eval"), ("", "export"), ("", "infer")}


def part_of(module: str) -> str:
    """``tunesmith.train.sft`` -> ``train``; ``tunesmith`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, src: Path) -> str:
    """``src/tunesmith/train/sft.py`` -> ``tunesmith.train.sft``."""
    rel = path.relative_to(src.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def is_module(name: str, src: Path) -> bool:
    """Whether ``tunesmith.x.y`` is a module or package file under ``src`` (the package)."""
    path = src.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every tunesmith import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path, src)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # `from tunesmith import infer` imports the subpackage tunesmith.infer.
            subs = [f"{name}.{a.name}" for a in node.names if is_module(f"{name}.{a.name}", src)]
            found += [(node.lineno, sub) for sub in subs] or [(node.lineno, name)]
    return [(line, name) for line, name in found if name.split(".")[0] == "tunesmith"]


def violations(src: Path = SRC) -> list[str]:
    """One line per import that points sideways or upwards (or into an unknown part)."""
    out = []
    for path in sorted(src.rglob("*.py")):
        importer = part_of(module_name(path, src))
        for line, name in imports(path, src):
            imported = part_of(name)
            where = f"{path.relative_to(src.parent)}:{line}: imports {name}"
            if importer not in LAYERS or imported not in LAYERS:
                unknown = importer if importer not in LAYERS else imported
                out.append(f"{where} ('{unknown}' has no layer in test_layers.LAYERS)")
            elif importer != imported and LAYERS[imported] >= LAYERS[importer]:
                if (importer, imported) in SAME_LAYER_ALLOWED:
                    continue
                way = "sideways" if LAYERS[imported] == LAYERS[importer] else "upwards"
                out.append(f"{where} ({way}: {importer} -> {imported})")
    return out


def test_every_import_points_downwards() -> None:
    found = violations()
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_the_checker_sees_lazy_relative_and_upward_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "tunesmith"
    for sub in ("data", "train", "infer"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "engine.py").write_text(
        "def f():\n    from tunesmith.train.checkpoint import x\n"  # lazy and sideways
    )
    (pkg / "data" / "report.py").write_text("from ..infer import engine\n")  # relative, upwards
    (pkg / "train" / "sft.py").write_text("import tunesmith.data.report\n")  # fine
    (pkg / "data" / "x.py").write_text("from tunesmith import train, __version__\n")  # upwards
    found = violations(pkg)
    assert len(found) == 3
    assert "x.py:1: imports tunesmith.train (upwards: data -> train)" in found[1]
    assert "engine.py:2: imports tunesmith.train.checkpoint (sideways: infer -> train)" in found[2]
    assert "report.py:1: imports tunesmith.infer.engine (upwards: data -> infer)" in found[0]


@pytest.mark.parametrize("part", ["eval", "serve"])
def test_planned_packages_have_a_layer(part: str) -> None:
    assert LAYERS["infer"] < LAYERS[part] < LAYERS["api"] < LAYERS["cli"]
