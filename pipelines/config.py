"""Typed run configs: YAML recipes with dotted command-line overrides.

A recipe is a YAML mapping validated by a pydantic model whose sub-models forbid unknown keys,
so a typo is an error naming the key. Overrides use dotted keys, e.g.
``--set sampling.n=8 --set scoring.layers=[6,12]``; values are parsed as YAML scalars/lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A recipe or override that does not fit the config model; the message names the key."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (empty file -> ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], dotted: str) -> None:
    """Set ``a.b.c=value`` in the nested mapping ``data`` (value parsed as YAML)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected KEY=VALUE with a dotted KEY, e.g. sampling.n=8")
    key, raw = dotted.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"override {dotted!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {dotted!r}: value is not valid YAML ({err})") from err
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def validation_message(err: ValidationError) -> str:
    """One line per problem: ``dotted.key: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())


def build_config(model: type[ConfigT], data: dict[str, Any], overrides: list[str] | None = None) -> ConfigT:
    """Validate ``data`` (after dotted ``overrides``) as ``model``; errors name the key."""
    data = json.loads(json.dumps(data))  # a deep copy that also rejects non-JSON values early
    for override in overrides or []:
        apply_override(data, override)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err)) from None


def load_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """``build_config`` on the YAML at ``path`` (or on ``{}`` when no path is given)."""
    return build_config(model, read_yaml(path) if path else {}, overrides)


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML next to the artifacts it produced."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
