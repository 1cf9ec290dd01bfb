"""Best-of-N selection rules on hand-made examples."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from actors.selection import argmax_index, argmin_index, random_index, select_best_of_n


def test_rules_pick_the_expected_candidate():
    sims = [0.93, 0.91, 0.97, 0.95]
    assert select_best_of_n("latent_sim", sims) == 1
    assert select_best_of_n("kl", [0.1, 0.4, 0.2, None]) == 1
    assert select_best_of_n("perplexity", [3.2, 2.5, None, 9.0]) == 1
    assert select_best_of_n("self_certainty", [1.0, 2.0, 5.0, 4.0]) == 2
    assert select_best_of_n("first", sims) == 0
    assert select_best_of_n("first", n=3) == 0


def test_ties_go_to_the_lowest_index():
    assert argmin_index([0.5, 0.2, 0.2, 0.9]) == 1
    assert argmax_index([0.5, 0.9, 0.2, 0.9]) == 1
    assert argmin_index([1.0, 1.0, 1.0]) == 0


def test_missing_scores_are_skipped():
    assert argmin_index([None, 0.3, float("nan"), 0.1]) == 3
    assert argmax_index([None, math.nan, 0.2]) == 2
    assert argmin_index([None, None]) == 0  # nothing to compare: single sampling


def test_random_is_seeded_per_prompt_and_roughly_uniform():
    assert random_index(8, seed=3, key="p1") == random_index(8, seed=3, key="p1")
    picks = [random_index(4, seed=0, key=k) for k in range(4000)]
    counts = Counter(picks)
    assert set(counts) == {0, 1, 2, 3}
    assert all(900 < c < 1100 for c in counts.values())
    assert [random_index(4, seed=1, key=k) for k in range(50)] != picks[:50]


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        select_best_of_n("entropy", [0.1])
    with pytest.raises(ValueError, match="needs scores"):
        select_best_of_n("latent_sim")
    with pytest.raises(ValueError, match="at least one"):
        select_best_of_n("kl", [])
    with pytest.raises(ValueError):
        random_index(0, seed=0)
