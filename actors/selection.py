"""Best-of-N selection rules: pure functions from a list of N scores to the chosen index.

Score rules are the registered scores (``actors.scores``: the paper's four and any plugin),
each ranked in its own direction (argmin or argmax). Every rule ignores missing scores (``None``
or NaN, e.g. token metrics of an empty response); ties go to the lowest index. Score rules never
choose an *empty* candidate (``empty[i]`` true: no generated token, whose "hidden state" is the
prompt's) unless every candidate is empty, and an unscored non-empty candidate comes before an
empty one; evaluation, ``dabon score`` and serving decide emptiness the same way, from the token
ids (``empty_flags``). ``select_best_of_n`` is the first of ``rank_candidates``.

Eligibility, one rule for every selector (scores and baselines alike): a candidate is *eligible*
when it is non-empty; when all N are empty, all are eligible. ``first`` is the first eligible
candidate and ``random`` a seeded uniform draw over the eligible ones, so a baseline and a score
rule never differ by the exclusion alone.

| rule             | picks                       | why                                       |
|------------------|-----------------------------|-------------------------------------------|
| ``latent_sim``   | argmin latent similarity    | furthest from the base model (the paper)  |
| ``kl``           | argmax KL(fine-tuned||base) | furthest from the base in distribution    |
| ``perplexity``   | argmin perplexity           | most likely under the fine-tuned model    |
| ``self_certainty`` | argmax self-certainty     | most confident (Kang et al. 2025)         |
| a plugin's name  | its direction               | ``scoring.plugins``                       |
| ``random``       | seeded uniform eligible one | baseline                                  |
| ``first``        | first eligible candidate    | single sampling                           |

The *budgeted* form of a score rule (``threshold`` tau >= 0, ``budgeted_choice``): per prompt, the
spread of the score over the *eligible* candidates (scored and non-empty; when every candidate
is empty, the scored ones, the set ``rank_candidates`` ranks) is max - min. When the spread is
at least tau the score rule chooses (``rank_candidates(...)[0]``); otherwise the *plain sample*,
single sampling's choice (``first_index``: the first non-empty candidate, 0 when all are
empty). tau = 0 is the score rule itself; tau = inf is single sampling. A prompt with no eligible candidate
gets the plain sample (which is also what the score rule picks there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Literal, Sequence

from actors.scores import ScoreError, get_score, registered

Scores = Sequence[float | None]


def _valid(scores: Scores) -> list[tuple[int, float]]:
    return [(i, float(s)) for i, s in enumerate(scores) if s is not None and not math.isnan(float(s))]


def argmin_index(scores: Scores) -> int:
    """Index of the smallest score; ties -> lowest index; no valid score -> 0."""
    valid = _valid(scores)
    return min(valid, key=lambda pair: (pair[1], pair[0]))[0] if valid else 0


def argmax_index(scores: Scores) -> int:
    """Index of the largest score; ties -> lowest index; no valid score -> 0."""
    valid = _valid(scores)
    return min(valid, key=lambda pair: (-pair[1], pair[0]))[0] if valid else 0


def eligible_indices(n: int, empty: Sequence[bool] | None = None) -> list[int]:
    """The eligible candidates of ``n``: those not ``empty`` (no generated token), or all ``n``
    when every one is empty or no flags are given."""
    if n <= 0:
        raise ValueError(f"n: expected at least one candidate, got {n}")
    if empty is None:
        return list(range(n))
    if len(empty) != n:
        raise ValueError(f"empty: {len(empty)} flags for {n} candidates")
    kept = [i for i, flag in enumerate(empty) if not flag]
    return kept or list(range(n))


def random_index(n: int, seed: int, key: str | int = "", empty: Sequence[bool] | None = None) -> int:
    """A uniform draw over the eligible candidates (``eligible_indices``) that depends only on
    (seed, key, the flags), not on call order. Without empty candidates: uniform in [0, n)."""
    eligible = eligible_indices(n, empty)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return eligible[random.Random(int.from_bytes(digest[:8], "big")).randrange(len(eligible))]


def first_index(n: int, empty: Sequence[bool] | None = None) -> int:
    """Single sampling: the first eligible candidate (index 0 unless it is empty and another is not)."""
    return eligible_indices(n, empty)[0]


BASELINE_RULES = ("random", "first")


def is_score_rule(rule: str) -> bool:
    """Whether ``rule`` is a registered score (not a baseline)."""
    return rule in registered()


def empty_flags(response_ids: Sequence[Sequence[int]]) -> list[bool]:
    """Per candidate, whether it is empty: no generated token id."""
    return [len(ids) == 0 for ids in response_ids]


def _without_empty(scores: Scores, empty: Sequence[bool] | None) -> list[float | None]:
    """``scores`` with those of empty candidates hidden, unless every candidate is empty."""
    if empty is None or all(empty) or not any(empty):
        return list(scores)
    if len(empty) != len(scores):
        raise ValueError(f"empty: {len(empty)} flags for {len(scores)} candidates")
    return [None if flag else score for score, flag in zip(scores, empty)]


def rank_candidates(rule: str, scores: Scores, empty: Sequence[bool] | None = None) -> list[int]:
    """All candidate indices, best first by a score rule: scored non-empty candidates in the rule's
    order (ties to the lower index), then unscored ones, then empty ones (each by index)."""
    try:
        direction = get_score(rule).direction
    except ScoreError:
        raise ValueError(f"rule: unknown {rule!r}; expected one of {', '.join(registered())}") from None
    if empty is not None and len(empty) != len(scores):
        raise ValueError(f"empty: {len(empty)} flags for {len(scores)} candidates")
    visible = _without_empty(scores, empty)
    sign = 1.0 if direction == "min" else -1.0
    scored = sorted((i for i, _ in _valid(visible)), key=lambda i: (sign * float(visible[i]), i))
    flags = list(empty) if empty is not None and not all(empty) else [False] * len(scores)
    rest = [i for i in range(len(scores)) if i not in set(scored)]
    return scored + [i for i in rest if not flags[i]] + [i for i in rest if flags[i]]


def check_threshold(threshold: float, field: str = "threshold") -> float:
    """``threshold`` as a float when it is a finite number >= 0; else ``ValueError`` naming ``field``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{field}: expected a finite number >= 0, got {threshold!r}")
    value = float(threshold)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{field}: expected a finite number >= 0, got {threshold!r}")
    return value


def score_spread(scores: Scores, empty: Sequence[bool] | None = None) -> float | None:
    """Max - min of the scores of the eligible candidates (scored and non-empty; all scored ones
    when every candidate is empty); ``None`` when no candidate is eligible."""
    if empty is not None and len(empty) != len(scores):
        raise ValueError(f"empty: {len(empty)} flags for {len(scores)} candidates")
    values = [value for _, value in _valid(_without_empty(scores, empty))]
    return max(values) - min(values) if values else None


@dataclasses.dataclass(frozen=True)
class BudgetedChoice:
    """A budgeted rule's choice: ``index``, the prompt's score ``spread`` (``None``: no eligible
    candidate) and who decided: ``"score"`` (spread >= threshold) or ``"plain"``."""

    index: int
    spread: float | None
    decided_by: Literal["score", "plain"]


def budgeted_choice(rule: str, scores: Scores, empty: Sequence[bool] | None = None, threshold: float = 0.0) -> BudgetedChoice:
    """The budgeted form of the score rule ``rule`` (module docstring): the score's choice when the
    spread of eligible scores is >= ``threshold`` (finite, >= 0), else the plain sample."""
    check_threshold(threshold)
    if len(scores) == 0:
        raise ValueError(f"rule {rule!r}: expected at least one candidate score")
    ranking = rank_candidates(rule, scores, empty)
    spread = score_spread(scores, empty)
    if spread is not None and spread >= threshold:
        return BudgetedChoice(ranking[0], spread, "score")
    return BudgetedChoice(first_index(len(scores), empty), spread, "plain")


def budgeted_ranking(rule: str, scores: Scores, empty: Sequence[bool] | None = None,
                     threshold: float = 0.0) -> tuple[list[int], BudgetedChoice]:
    """All candidate indices, best first, under the budgeted rule, and its ``BudgetedChoice``: the
    score's ranking (``rank_candidates``) when the score decides, else sampling order with empty
    candidates last (the plain sample first)."""
    choice = budgeted_choice(rule, scores, empty, threshold)
    if choice.decided_by == "score":
        return rank_candidates(rule, scores, empty), choice
    return rank_candidates(rule, [None] * len(scores), empty), choice


def budgeted_index(rule: str, scores: Scores, empty: Sequence[bool] | None = None, threshold: float = 0.0) -> int:
    """The index ``budgeted_choice`` picks."""
    return budgeted_choice(rule, scores, empty, threshold).index


def select_best_of_n(rule: str, scores: Scores | None = None, n: int | None = None, seed: int = 0, key: str | int = "",
                     empty: Sequence[bool] | None = None, threshold: float | None = None) -> int:
    """Index chosen by ``rule`` (a registered score, ``random`` or ``first``).

    Score rules need ``scores`` and choose the first of ``rank_candidates`` (so an empty candidate
    only when all are), or with a ``threshold`` (finite, >= 0) the budgeted rule's choice
    (``budgeted_choice``); ``random`` and ``first`` need ``n`` (or take ``len(scores)``), choose
    among the eligible candidates (``empty`` flags: the same rule as score rules) and take no
    threshold.
    """
    if is_score_rule(rule):
        if scores is None:
            raise ValueError(f"rule {rule!r} needs scores")
        if len(scores) == 0:
            raise ValueError(f"rule {rule!r}: expected at least one candidate score")
        if threshold is not None:
            return budgeted_index(rule, scores, empty, threshold)
        return rank_candidates(rule, scores, empty)[0]
    if threshold is not None and rule in BASELINE_RULES:
        raise ValueError(f"threshold: only a score rule takes one, not {rule!r}")
    count = n if n is not None else (len(scores) if scores is not None else None)
    if count is None:
        raise ValueError(f"rule {rule!r} needs n or scores")
    if rule == "random":
        return random_index(count, seed, key, empty)
    if rule == "first":
        return first_index(count, empty)
    raise ValueError(f"rule: unknown {rule!r}; expected one of {', '.join([*registered(), *BASELINE_RULES])}")
