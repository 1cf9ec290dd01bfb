"""The score registry: the one place a Best-of-N score is defined.

A score is a ``Score`` object: its ``name`` (the key of its values and of its selector),
``direction`` (``"min"``: the smallest value is best, argmin; ``"max"``: argmax), whether it is
``per_layer`` (one value per candidate at every scored layer, stored as ``<name>_<L>`` columns)
or one value per candidate, what it ``needs`` from the models, its ``label`` in reports, and the
function that computes it. There are three kinds, by what the function reads:

- ``HiddenStateScore``: ``from_hidden(finetuned, base)`` on one candidate's last-token hidden
  states (1-D tensors) of both views at one layer (needs ``hidden_states``); always per layer;
- ``TokenScore``: ``token_values(logp, logq, targets)`` per response token (log-probabilities of
  the fine-tuned and, when ``needs_base_logits``, the base view's next-token distributions) whose
  mean over the response is passed through ``finish`` (needs ``finetuned_logits``, and
  ``base_logits`` for KL);
- ``DerivedScore``: ``combine(scores, empty, layer)`` of other registered scores (``requires``)
  of one prompt's N candidates, e.g. a combination of two scores or a threshold rule.

``actors.scorer.AttributionScorer`` computes the scores a run asks for (and what they require)
from these definitions; ``actors.selection`` reads their direction, ``pipelines.metrics`` /
``pipelines.report`` their columns and labels, and the Serve app ranks by any of them
(``scoring.rule``).

Bring your own: a class in your own module, named in a recipe as ``scoring.plugins:
["mypkg.probe:MyScore"]`` (``load_plugins``), is instantiated with no arguments and registered
in every process that validates or rebuilds the scoring config (the driver, Ray Data scorer
actors, Serve replicas). ``examples/selectors/latent_perplexity.py`` is one.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Iterable, Sequence

HIDDEN_STATES = "hidden_states"  # last-token hidden states of both views at the scored layers
FINETUNED_LOGITS = "finetuned_logits"  # next-token distributions of the fine-tuned view over the response
BASE_LOGITS = "base_logits"  # the same of the base view
DIRECTIONS = ("min", "max")


class ScoreError(ValueError):
    """A score definition or plugin that cannot be registered or used; the message names it."""


class Score:
    """Base of every score (see module doc). Subclasses set the class attributes and implement
    their kind's function."""

    name: str = ""
    direction: str = "min"
    per_layer: bool = False
    label: str = ""
    requires: tuple[str, ...] = ()

    @property
    def needs(self) -> frozenset[str]:
        """What the scorer must compute for this score (beyond the scores it ``requires``)."""
        return frozenset()

    @property
    def argument(self) -> str:
        """``argmin`` or ``argmax``."""
        return "argmin" if self.direction == "min" else "argmax"

    def column(self, layer: int | None = None) -> str:
        """The evaluation-shard column (and selector name) of this score, at ``layer`` when per layer."""
        return score_column(self.name, layer if self.per_layer else None)

    def selector_label(self, layer: int | None = None) -> str:
        """``latent sim, layer 12 (argmin)``, ``KL to base (argmax)``: the report's label."""
        where = f", layer {layer}" if self.per_layer and layer is not None else ""
        return f"{self.label or self.name}{where} ({self.argument})"


class HiddenStateScore(Score):
    """A per-layer score from one candidate's last-token hidden states of both views."""

    per_layer = True

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({HIDDEN_STATES})

    def from_hidden(self, finetuned: Any, base: Any) -> float:
        """The score of one candidate at one layer from its two hidden states (1-D tensors)."""
        raise NotImplementedError


class TokenScore(Score):
    """A mean over the response tokens of a per-token value of the next-token distributions."""

    needs_base_logits: bool = False

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({FINETUNED_LOGITS, BASE_LOGITS} if self.needs_base_logits else {FINETUNED_LOGITS})

    def token_values(self, logp: Any, logq: Any | None, targets: Any) -> Any:
        """Per position: a float64 value from the fine-tuned log-probabilities ``logp`` (positions x
        vocabulary, float32), the base's ``logq`` (``None`` unless ``needs_base_logits``) and the
        response tokens ``targets`` those positions predict."""
        raise NotImplementedError

    def finish(self, mean: float) -> float:
        """The score from the mean of ``token_values`` over the response."""
        return mean


class DerivedScore(Score):
    """A score computed from other registered scores (``requires``) of one prompt's candidates."""

    def combine(self, scores: dict[str, Any], empty: Sequence[bool], layer: int | None) -> list[float | None]:
        """N values from ``scores`` (name -> N values, or layer -> N values for a per-layer score),
        ``empty`` flags, and the ``layer`` being computed (``None`` unless this score is per layer)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# The paper's scores (METHOD.md section 3)


class LatentSimilarity(HiddenStateScore):
    """Cosine between the fine-tuned and the base hidden state at the last token (the paper)."""

    name = "latent_sim"
    direction = "min"
    label = "latent sim"

    def from_hidden(self, finetuned: Any, base: Any) -> float:
        import torch

        return float(torch.nn.functional.cosine_similarity(finetuned.float(), base.float(), dim=-1))


class KLToBase(TokenScore):
    """Mean KL(fine-tuned || base) of the next-token distributions over the response."""

    name = "kl"
    direction = "max"
    label = "KL to base"
    needs_base_logits = True

    def token_values(self, logp: Any, logq: Any | None, targets: Any) -> Any:
        import torch

        return (logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64)


class Perplexity(TokenScore):
    """exp of the mean negative log-likelihood of the response under the fine-tuned model."""

    name = "perplexity"
    direction = "min"
    label = "perplexity"

    def token_values(self, logp: Any, logq: Any | None, targets: Any) -> Any:
        return -logp.gather(-1, targets[:, None]).squeeze(-1)

    def finish(self, mean: float) -> float:
        return math.exp(mean)


class SelfCertainty(TokenScore):
    """Mean KL(uniform || p_fine-tuned) over the response (Kang et al. 2025)."""

    name = "self_certainty"
    direction = "max"
    label = "self-certainty"

    def token_values(self, logp: Any, logq: Any | None, targets: Any) -> Any:
        import torch

        return -math.log(logp.shape[-1]) - logp.mean(-1, dtype=torch.float64)


BUILTIN_SCORES: tuple[Score, ...] = (LatentSimilarity(), KLToBase(), Perplexity(), SelfCertainty())
_REGISTRY: dict[str, Score] = {score.name: score for score in BUILTIN_SCORES}
_PLUGINS: dict[str, str] = {}  # import path -> the name it registered


# ----------------------------------------------------------------------------------------
# Registry


def score_column(name: str, layer: int | None = None) -> str:
    """``latent_sim_12`` for a per-layer score at a layer; the name itself otherwise."""
    return f"{name}_{layer}" if layer is not None else name


def registered() -> dict[str, Score]:
    """Every registered score by name, the paper's first, then plugins in registration order."""
    return dict(_REGISTRY)


def get_score(name: str) -> Score:
    """The registered score ``name``; ``ScoreError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ScoreError(f"unknown score {name!r}; expected one of {', '.join(_REGISTRY)} "
                         "(or register your own with scoring.plugins)") from None


def _check(score: Score) -> None:
    if not isinstance(score, Score):
        raise ScoreError(f"{score!r} is not an actors.scores.Score")
    name = score.name
    if not name or not name.replace("_", "").isalnum() or name[0].isdigit():
        raise ScoreError(f"{type(score).__name__}: name {name!r} must be a non-empty identifier")
    if name in ("single", "random", "first", "oracle_majority"):
        raise ScoreError(f"{type(score).__name__}: name {name!r} is reserved for a baseline selector")
    if score.direction not in DIRECTIONS:
        raise ScoreError(f"score {name}: direction {score.direction!r}; expected 'min' or 'max'")
    if type(score).needs is Score.needs and not isinstance(score, DerivedScore):
        raise ScoreError(f"score {name}: subclass HiddenStateScore, TokenScore or DerivedScore")
    if isinstance(score, DerivedScore) and not score.requires:
        raise ScoreError(f"score {name}: a DerivedScore names the scores it combines in `requires`")
    for other in score.requires:
        required = get_score(other)
        if required.per_layer and not score.per_layer:
            raise ScoreError(f"score {name}: requires the per-layer score {other!r}, so it must be per_layer too")


def register(score: Score, replace: bool = False) -> Score:
    """Add ``score`` to the registry (its requirements must be registered first); registering the
    same class again is a no-op, another score under a taken name an error unless ``replace``."""
    _check(score)
    existing = _REGISTRY.get(score.name)
    if existing is not None and not replace:
        if type(existing) is type(score) or (type(existing).__qualname__ == type(score).__qualname__
                                             and type(existing).__module__ == type(score).__module__):
            return existing
        raise ScoreError(f"score {score.name!r} is already registered (by {type(existing).__module__}."
                         f"{type(existing).__qualname__})")
    _REGISTRY[score.name] = score
    return score


def load_plugin(path: str) -> Score:
    """Import ``"package.module:ClassName"``, instantiate the class and register it; returns the
    score. Errors name the path."""
    if path in _PLUGINS:
        return _REGISTRY[_PLUGINS[path]]
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ScoreError(f"plugin {path!r}: expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ScoreError(f"plugin {path!r}: cannot import {module_name!r} ({err}): is its folder on PYTHONPATH "
                         "(or in the job's working_dir)?") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ScoreError(f"plugin {path!r}: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    score = target() if isinstance(target, type) else target
    if not isinstance(score, Score):
        raise ScoreError(f"plugin {path!r}: expected a subclass of actors.scores.Score, got {type(score).__name__}")
    try:
        registered_score = register(score)
    except ScoreError as err:
        raise ScoreError(f"plugin {path!r}: {err}") from None
    _PLUGINS[path] = registered_score.name
    return registered_score


def load_plugins(paths: Iterable[str]) -> list[Score]:
    """``load_plugin`` of each path, in order (a plugin may require one loaded before it)."""
    return [load_plugin(path) for path in paths]


def with_requirements(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` and every score they require, transitively, in registry order (so the paper's
    scores come first and a score comes after what it requires)."""
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(get_score(name).requires)
    return tuple(name for name in _REGISTRY if name in wanted)


def score_columns(names: Iterable[str], layers: Sequence[int]) -> list[str]:
    """Shard columns of the scores ``names`` at ``layers`` (per-layer scores) in registry order."""
    columns = []
    for name in with_requirements(names):
        score = get_score(name)
        columns += [score.column(layer) for layer in layers] if score.per_layer else [score.name]
    return columns


def column_score(column: str) -> tuple[Score, int | None] | None:
    """The (score, layer) a shard column holds, or ``None`` when it is not a score column."""
    if column in _REGISTRY and not _REGISTRY[column].per_layer:
        return _REGISTRY[column], None
    name, _, layer = column.rpartition("_")
    if layer.isdigit() and name in _REGISTRY and _REGISTRY[name].per_layer:
        return _REGISTRY[name], int(layer)
    return None
