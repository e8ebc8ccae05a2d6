"""What the server serves: one resident base model and the LoRA adapters on it, by name.

Adapters come only from ``--adapters name=path`` (checked and loaded at start) or, when
``--adapter_root`` is set, from folders inside it named by the request's ``model``
(loaded on first use). A name from a request is never a path of its own: ``..``, absolute
paths, and anything resolving outside the root (symlinks) are refused. Weights load only
from ``adapter_model.safetensors`` (never a pickle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tunesmith.config import DeployArgs, InferCommandArgs, from_dict
from tunesmith.model.adapters import check_adapter, resolve_base, run_args
from tunesmith.options import model_options
from tunesmith.utils import UserError, error_line, logger

NAME = re.compile(r"^[A-Za-z0-9][\w.\-]{0,63}$")
ROOT_NAME = re.compile(r"^[\w.\-]+(/[\w.\-]+){0,2}$")
"""A model name under --adapter_root: up to three plain folder names."""


@dataclass
class Adapter:
    """One servable adapter."""

    path: Path
    """Its checkpoint directory (resolved)."""
    peft_name: str
    """Its name inside the peft model (``a0``, ``a1``, …: user names may contain dots)."""
    system: str | None
    """The system prompt of the run that trained it (used when a request has none)."""


@dataclass
class Catalog:
    """The served names: the base model and every adapter."""

    base_name: str
    """The base model's served name (``--served_model_name``)."""
    base_system: str | None
    """``--system`` for requests to the base model without a system message."""
    adapters: dict[str, Adapter] = field(default_factory=dict)
    """Adapters by served name (start-up ones, then those loaded from the root)."""
    root: Path | None = None
    """``--adapter_root`` (resolved), or None."""

    def names(self) -> list[str]:
        """Every served name: the base, the adapters, and the root's adapter folders."""
        names = [self.base_name, *self.adapters]
        if self.root is not None:
            for cfg in sorted(self.root.glob("**/adapter_config.json")):
                rel = cfg.parent.relative_to(self.root).as_posix()
                ok = ROOT_NAME.match(rel) and _safe_adapter_dir(cfg.parent)
                if rel not in names and ok and self._inside(cfg.parent):
                    names.append(rel)
        return names

    def _inside(self, path: Path) -> bool:
        assert self.root is not None
        return path.resolve().is_relative_to(self.root)

    def lookup(self, name: str) -> tuple[str | None, Adapter | None] | None:
        """(peft adapter name or None for the base, the adapter) for a served ``name``;
        None when nothing of that name may be served."""
        if name == self.base_name:
            return None, None
        if name in self.adapters:
            a = self.adapters[name]
            return a.peft_name, a
        if self.root is None or not ROOT_NAME.match(name):
            return None
        parts = PurePosixPath(name).parts
        if any(p in {".", ".."} for p in parts):
            return None
        path = (self.root / name).resolve()  # symlinks resolved: must still be inside
        if not path.is_relative_to(self.root) or not _safe_adapter_dir(path):
            return None
        a = Adapter(path, f"a{len(self.adapters)}", run_args(path).get("system"))
        self.adapters[name] = a
        return a.peft_name, a


def _safe_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (
        path / "adapter_model.safetensors"
    ).is_file()


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``name=path`` (or a bare checkpoint path, served under its folder name) to checked
    adapter directories; a UserError for a bad name, path or a pickled adapter."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not NAME.match(name):
            raise UserError(
                f"--adapters {spec}: the name '{name}' must be letters, digits, '.', '_' or '-'"
            )
        if name in out:
            raise UserError(f"--adapters {spec}: the name '{name}' is given twice")
        checked = check_adapter(path).resolve()
        if not (checked / "adapter_model.safetensors").is_file():
            raise UserError(
                f"--adapters {spec}: only safetensors adapters are served "
                "(adapter_model.bin is a pickle, which can run code when loaded)"
            )
        out[name] = checked
    return out


def load_served(args: DeployArgs) -> tuple[Any, Any, Catalog]:
    """Load the base model (``--model``, or the first adapter's run's), every start-up
    adapter under its name, and the tokenizer; the catalog of served names."""
    import torch
    from peft import PeftModel

    from tunesmith.model.load import load_model, load_tokenizer, resolve_dtype

    paths = parse_adapters(args.adapters)
    root = None
    if args.adapter_root is not None:
        root = Path(args.adapter_root).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"--adapter_root {args.adapter_root}: no such directory")
    infer_args = from_dict(InferCommandArgs, {
        "model": args.model, "adapters": [str(p) for p in paths.values()],
        "use_hf": args.use_hf, "system": args.system, "model_type": args.model_type,
        "template": args.template,
    })  # fmt: skip
    base = resolve_base(model_options(infer_args), infer_args.adapters, infer_args.system)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.torch_dtype, device.type)
    tokenizer = load_tokenizer(base.model_dir if paths else base.tokenizer_dir)
    model = load_model(base.model_dir, dtype, args.attn_impl, device=device)
    served = args.served_model_name or _short_name(base.name)
    catalog = Catalog(served, args.system, root=root)
    for i, (name, path) in enumerate(paths.items()):
        peft_name = f"a{i}"
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=peft_name)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=peft_name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"--adapters {name}={path}: does not fit the base model {base.name} "
                f"({error_line(e)})"
            ) from None
        system = args.system if args.system is not None else run_args(path).get("system")
        catalog.adapters[name] = Adapter(path, peft_name, system)
        logger.info(f"adapter {name}: {path}")
    if name_clash := set(catalog.adapters) & {served}:
        raise UserError(f"--adapters: '{name_clash.pop()}' is also the base model's name")
    model.eval()
    return model, tokenizer, catalog


def _short_name(name: str) -> str:
    """A served name for a model path: its folder name (hub ids and aliases stay)."""
    p = Path(name)
    return p.name if p.exists() else name


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def default_sampling(model: Any) -> dict[str, Any]:
    """Sampling values for fields a request leaves out: the model's generation config when
    it samples (as vLLM serves by default), else OpenAI's defaults (temperature 1)."""
    cfg = model.generation_config
    rp = float(getattr(cfg, "repetition_penalty", None) or 1.0)
    if not getattr(cfg, "do_sample", False):
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": rp}
    return {
        "temperature": float(cfg.temperature or 1.0),
        "top_p": float(cfg.top_p or 1.0),
        "top_k": int(cfg.top_k or 0),
        "repetition_penalty": rp,
    }
