"""YAML + dotted-override loading into the typed tree, with one clear error per mistake."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..errors import ConfigError
from .choices import choice_problem, choices_of
from .presets import preset_dict
from .schema import Config

__all__ = ["load_config", "config_from_dict", "config_to_dict", "dump_config", "parse_overrides",
           "RECIPES_DIR", "recipe_names", "resolve_config_path"]

# The shipped recipes live inside the package so that a wheel (non-editable) install has them;
# the repository's top-level ``configs`` is a link to this folder.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"


def recipe_names() -> list:
    """Names accepted by ``-c NAME`` from any folder (the shipped ``configs/*.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """An existing YAML file, else a shipped recipe named ``path`` (``tiny_cpu`` or ``tiny_cpu.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    recipe = RECIPES_DIR / f"{name}.yaml"
    if len(p.parts) == 1 and recipe.is_file():
        return recipe
    close = difflib.get_close_matches(name, recipe_names(), n=1)
    hint = f" Did you mean the recipe `{close[0]}`?" if close else ""
    raise ConfigError(f"config file `{p}` does not exist; pass an existing YAML file with -c, or a shipped "
                      f"recipe name ({', '.join(recipe_names())}).{hint}")


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["model.num_layers=4", "train.lr=1e-4"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form section.key=value (e.g. model.num_layers=4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override `{item}` has an empty key component")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}` conflicts with an earlier override of `{p}`")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    if choices_of(tp) is not None:  # a Literal choice (schema.py): the annotation lists the allowed values
        problem = choice_problem(path, value, tp)
        if problem:
            raise ConfigError(problem)
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (list, List_):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} `{value!r}`")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} `{value!r}`")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return value


List_ = typing.List


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" Did you mean `{(path + '.') if path else ''}{close[0]}`?" if close else ""
            raise ConfigError(f"unknown config key `{where}`.{hint} Valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build the tree, applying ``model.preset`` first so that explicit fields win."""
    data = dict(data or {})
    model = dict(data.get("model") or {})
    if model.get("preset"):
        data["model"] = _merge(preset_dict(model["preset"]), model)
    return _build(Config, data, "")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (optional) and apply dotted overrides; validation is separate."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file `{p}` is not valid YAML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file `{p}` cannot be read ({err}); pass a YAML text file with -c") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file `{p}` must hold a mapping of sections at the top level")
    return config_from_dict(_merge(data, parse_overrides(overrides)))


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (printed by --dry-run, saved next to checkpoints)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
