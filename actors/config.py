"""Config plumbing and the config sections every layer shares.

A run is configured by one typed tree (``pipelines.evaluate.EvalConfig``,
``pipelines.distill.DistillConfig``, ``serve_app.options.ServeConfig``) whose fields are typed
sections; this module holds what those trees have in common:

- plumbing: ``read_yaml``, dotted ``--set a.b=value`` overrides (``apply_override``),
  ``build_config`` / ``load_config`` (validate, errors name the full dotted key),
  ``save_config`` (the resolved tree with every default, so a rerun can compare it);
- shared sections: ``PromptConfig`` (how a model sees a prompt: system prompt and response
  prefix; the sampler, judge, scorer, trainer and server all read it), ``PoolConfig`` (a Ray
  actor pool), ``RayConfig`` (where to run), ``ReportConfig`` (seeds, bootstrap, calibration).

Models use ``Strict`` (unknown keys are errors) so that a typo names its key instead of being
dropped.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the config model; the message names the key."""


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def refuse_renamed(data: Any, renamed: dict[str, str]) -> Any:
    """For a ``mode="before"`` validator: a mapping that uses an old key name is refused with the
    new one named (``num_generations: renamed n, ...``), instead of a bare "extra input"."""
    if isinstance(data, dict):
        old = [key for key in renamed if key in data]
        if old:
            raise ValueError("; ".join(f"{key}: renamed {renamed[key]} (dabon's one sampling vocabulary: n candidates, "
                                       "max_new_tokens)" for key in old))
    return data


# ----------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------


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


def parse_override(dotted: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, value parsed as YAML)."""
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
    return parts, value


def set_path(data: dict[str, Any], parts: list[str], value: Any, where: str | None = None) -> None:
    """Set ``data[parts[0]]...[parts[-1]] = value``, creating mappings on the way."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where or '.'.join(parts)}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def apply_override(data: dict[str, Any], dotted: str) -> None:
    """Set ``a.b.c=value`` in the nested mapping ``data`` (value parsed as YAML)."""
    parts, value = parse_override(dotted)
    set_path(data, parts, value, where=f"override {dotted!r}")


# "sampling.n: message" at the start of a validator's message: a field below the failing one
_LEADING_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.DOTALL)


def error_clauses(loc: tuple[Any, ...], message: str) -> list[str]:
    """``"full.dotted.key: message"`` clauses of one pydantic error: list indices are written
    ``[i]``, and a validator's own ``"field: msg; other: msg"`` message is joined to its location."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    where = "".join(parts)
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    clauses = []
    for clause in message.split("; "):
        match = _LEADING_FIELD.match(clause)
        if match and " " not in match.group(1):
            clauses.append(f"{where}.{match.group(1)}: {match.group(2)}" if where else clause)
        else:
            clauses.append(f"{where or 'config'}: {clause}")
    return clauses


def validate(model: type[ConfigT], data: Any, where: str | None = None) -> ConfigT:
    """``model.model_validate(data)`` with errors as ``ConfigError`` naming the full key
    (prefixed by ``where``, the section's own key, when given)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        prefix = (where,) if where else ()
        clauses = [clause for e in err.errors() for clause in error_clauses((*prefix, *e["loc"]), e["msg"])]
        raise ConfigError("; ".join(clauses)) from None


def typed_options(model: type[ConfigT], data: Any, where: str) -> ConfigT:
    """Validate the mapping ``data`` as ``model`` from inside another model's validator (options
    whose type depends on a sibling field, e.g. a judge's options by its name). Errors are raised
    as ``ValueError("<where>.<key>: message")``, so the enclosing config names the full dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        clauses = [clause for e in err.errors() for clause in error_clauses((where, *e["loc"]), e["msg"])]
        raise ValueError("; ".join(clauses)) from None


def options_by_kind(data: Any, kind: str, default: str, registry: Mapping[str, type[BaseModel]]) -> Any:
    """For the ``mode="before"`` validator of a section whose ``options`` model is chosen by a
    sibling field ``kind`` (a generator's ``backend``, a judge's ``name``; ``default`` when absent):
    the mapping ``data`` with ``options`` validated once into ``registry[kind]`` (absent: its
    defaults), so the section holds the typed model and nothing validates it again. Options that
    already are that model are kept as they are; another options model is refused by name; a
    mapping's errors name ``options.<key>`` (``typed_options``). ``data`` that is not a mapping, or
    whose ``kind`` is not registered, is returned unchanged for the field validation to report."""
    if not isinstance(data, dict):
        return data
    name = data.get(kind, default)
    model = registry.get(name) if isinstance(name, str) else None
    if model is None:
        return data
    options = data.get("options", {})
    if isinstance(options, model):
        return data
    if isinstance(options, BaseModel):
        raise ValueError(f"options: {type(options).__name__} given, but {kind} {name!r} takes {model.__name__}")
    return {**data, "options": typed_options(model, options, "options")}


def build_config(model: type[ConfigT], data: dict[str, Any], overrides: list[str] | None = None) -> ConfigT:
    """Validate ``data`` (after dotted ``overrides``) as ``model``; errors name the key."""
    data = copy.deepcopy(data)
    for override in overrides or []:
        apply_override(data, override)
    return validate(model, data)


def load_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """``build_config`` on the YAML at ``path`` (or on ``{}`` when no path is given)."""
    return build_config(model, read_yaml(path) if path else {}, overrides)


def config_yaml(config: BaseModel) -> str:
    """The resolved config, every default included, as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (a key absent on one side
    equals ``null`` or an empty list, so a setting added later with a null or empty default, such
    as ``scoring.plugins``, changes nothing)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if old in (None, []) and new in (None, []):
        return []
    return [] if old == new else [prefix.rstrip(".") or "config"]


# ----------------------------------------------------------------------------------------
# Shared sections
# ----------------------------------------------------------------------------------------


class PromptConfig(Strict):
    """How a model sees a prompt before its response: its own chat template with
    ``system_prompt`` (``null``: the template's default), then ``response_prefix`` (e.g.
    ``"<think>\\n"``, opening the reasoning). Training, sampling, judging, scoring and serving
    read the same section, so they build the same token ids."""

    system_prompt: str | None = None
    response_prefix: str = ""


class PoolConfig(Strict):
    """A Ray actor pool: ``min_actors``..``max_actors`` actors (elastic when they differ), each
    with ``num_cpus`` / ``num_gpus``, fed ``batch_size`` rows at a time; ``torch_threads`` per
    actor (``null``: torch's default); ``label_selector``: node labels the actors must run on
    (e.g. ``{"ray.io/accelerator-type": "A10G"}`` or a label of your own node type)."""

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=4, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    label_selector: dict[str, str] = {}

    @model_validator(mode="after")
    def _sizes(self) -> "PoolConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors: {self.max_actors} must be >= min_actors ({self.min_actors})")
        return self


class LightPoolConfig(PoolConfig):
    """A pool of light actors (the keyword judge): half a CPU and larger batches by default."""

    num_cpus: float = Field(default=0.5, ge=0)
    batch_size: int = Field(default=16, ge=1)


class RayConfig(Strict):
    """Where to run: ``address`` of a cluster (``auto``), or none for a local Ray in-process with
    ``num_cpus`` logical CPUs (default: max(4, cores + 2), so actor pools never hold every CPU).
    ``object_store_mb``: the local object store. ``shared_mounts``: local directories that every
    node of the cluster mounts (NFS, a mounted bucket); on a cluster of more than one node a run's
    files must lie on a storage URI (``s3://``, ``gs://``) or under one of these."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int = Field(default=512, ge=64)
    shared_mounts: list[str] = []


class ReportConfig(Strict):
    """Seed of random selection and bootstrap, bootstrap resamples, interval level, and where the
    calibrated layer is chosen: ``calibration_fraction`` of each benchmark's prompts (a hash split)
    or all of ``calibration_benchmark``. ``threshold`` (finite, >= 0; ``null``: none) adds the
    budgeted selector ``budgeted_<column>`` (``actors.selection.budgeted_choice``) on the score
    column ``threshold_score`` (default: ``latent_sim`` at the first reported layer); ``dabon
    budget`` chooses the threshold."""

    seed: int = 0
    bootstrap: int = Field(default=1000, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    calibration_fraction: float = Field(default=0.3, gt=0, lt=1)
    calibration_benchmark: str | None = None
    threshold: float | None = None
    threshold_score: str | None = None

    @model_validator(mode="after")
    def _budgeted(self) -> "ReportConfig":
        from actors.scores import column_score
        from actors.selection import check_threshold

        if self.threshold is not None:
            check_threshold(self.threshold, "threshold")
        if self.threshold_score is not None:
            if self.threshold is None:
                raise ValueError("threshold_score: given without threshold (set report.threshold, e.g. from dabon budget)")
            if column_score(self.threshold_score) is None:
                raise ValueError(f"threshold_score: {self.threshold_score!r} is not a score column (e.g. latent_sim_12, kl)")
        return self
