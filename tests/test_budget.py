"""The budgeted selector (issue 19, item 4): the rule, its threshold curve and choice, `dabon budget`.

Every number is checked against a slow reference written here: a plain loop over candidates for
the rule, a per-threshold loop over prompts with hand-counted outcomes for the curve.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from actors.selection import (
    budgeted_choice,
    budgeted_ranking,
    rank_candidates,
    select_best_of_n,
)

DIRECTIONS = {"latent_sim": "min", "kl": "max", "perplexity": "min", "self_certainty": "max"}


def slow_budgeted(rule, scores, empty, threshold):
    """The rule spelled out: eligible = scored and non-empty (all scored ones when every candidate
    is empty); spread = max - min; spread >= tau -> the best eligible (ties: lowest index; no
    eligible -> the first non-empty); else the first non-empty candidate (0 if none)."""
    n = len(scores)
    flags = empty if empty is not None else [False] * n
    every_empty = all(flags)

    def usable(value):
        return value is not None and not math.isnan(value)

    eligible = [i for i in range(n) if usable(scores[i]) and (every_empty or not flags[i])]
    first_non_empty = 0
    for i in range(n):
        if not flags[i]:
            first_non_empty = i
            break
    if not eligible:
        return first_non_empty, None, "plain"
    values = [scores[i] for i in eligible]
    spread = max(values) - min(values)
    if spread < threshold:
        return first_non_empty, spread, "plain"
    best = eligible[0]
    for i in eligible[1:]:
        better = scores[i] < scores[best] if DIRECTIONS[rule] == "min" else scores[i] > scores[best]
        if better:
            best = i
    return best, spread, "score"


def random_table(rng, count=400):
    cases = []
    for _ in range(count):
        n = rng.randint(1, 5)
        scores = [rng.choice([None, math.nan, 0.1, 0.2, 0.2, 0.5, 0.9, rng.random()]) for _ in range(n)]
        empty = None if rng.random() < 0.2 else [rng.random() < 0.3 for _ in range(n)]
        threshold = rng.choice([0.0, 0.1, 0.3, 0.4, 0.8, rng.random(), 1e9])
        cases.append((rng.choice(list(DIRECTIONS)), scores, empty, threshold))
    return cases


def test_budgeted_rule_matches_the_slow_reference_on_random_tables():
    for rule, scores, empty, threshold in random_table(random.Random(19)):
        choice = budgeted_choice(rule, scores, empty, threshold)
        index, spread, decided = slow_budgeted(rule, scores, empty, threshold)
        assert (choice.index, choice.decided_by) == (index, decided), (rule, scores, empty, threshold)
        assert choice.spread == (None if spread is None else pytest.approx(spread))
        assert select_best_of_n(rule, scores, empty=empty, threshold=threshold) == index


def test_threshold_zero_is_the_score_rule_and_a_huge_one_is_the_plain_sample():
    for rule, scores, empty, _ in random_table(random.Random(7)):
        assert budgeted_choice(rule, scores, empty, 0.0).index == rank_candidates(rule, scores, empty)[0]
        flags = empty or [False] * len(scores)
        first = next((i for i, flag in enumerate(flags) if not flag), 0)
        assert budgeted_choice(rule, scores, empty, 1e12).index == first


def test_edges_by_hand():
    # all empty: the plain sample is 0; at tau 0 the score ranks the (empty) scored candidates
    assert budgeted_choice("latent_sim", [0.9, 0.1, 0.5], [True, True, True], 0.9).index == 0
    assert budgeted_choice("latent_sim", [0.9, 0.1, 0.5], [True, True, True], 0.0).index == 1
    # no usable score: the first non-empty candidate, decided by nobody but plain sampling
    choice = budgeted_choice("kl", [None, math.nan, None], [True, False, False], 0.0)
    assert (choice.index, choice.spread, choice.decided_by) == (1, None, "plain")
    # one eligible candidate: spread 0, so only tau 0 lets the score decide
    assert budgeted_choice("latent_sim", [0.3, 0.1], [False, True], 0.0).decided_by == "score"
    assert budgeted_choice("latent_sim", [0.3, 0.1], [False, True], 0.01).decided_by == "plain"
    # a spread equal to tau: the score decides (>=); ties inside go to the lower index
    choice = budgeted_choice("latent_sim", [0.5, 0.25, 0.25], None, 0.25)
    assert (choice.index, choice.spread, choice.decided_by) == (1, 0.25, "score")
    # an empty candidate's score does not widen the spread
    assert budgeted_choice("latent_sim", [0.5, 0.45, 0.0], [False, False, True], 0.1).decided_by == "plain"


def test_budgeted_ranking_puts_the_choice_first():
    ranking, choice = budgeted_ranking("latent_sim", [0.5, 0.4, 0.1], [True, False, False], 0.05)
    assert choice.decided_by == "score" and ranking == [2, 1, 0]
    ranking, choice = budgeted_ranking("latent_sim", [0.5, 0.4, 0.38], [True, False, False], 0.05)
    assert choice.decided_by == "plain" and ranking == [1, 2, 0]


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", True])
def test_a_bad_threshold_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="threshold: expected a finite number >= 0"):
        select_best_of_n("latent_sim", [0.1, 0.2], threshold=bad)


def test_a_baseline_rule_takes_no_threshold():
    with pytest.raises(ValueError, match="threshold: only a score rule"):
        select_best_of_n("random", n=3, threshold=0.1)
