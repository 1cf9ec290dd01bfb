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


# ---------------------------------------------------------------------------------------------
# One rule at the edges (issue 15): select_best_of_n is the first of rank_candidates, and an
# empty candidate is one with no token id, in evaluation, `dabon score` and serving alike.

EDGES = [
    # (rule, scores, empty): the non-empty candidates have no usable score
    ("kl", [None, math.nan], [True, False]),
    ("latent_sim", [0.1, None, None], [True, False, False]),
    ("perplexity", [math.nan, None, 2.0], [False, False, True]),
    ("self_certainty", [None, None], [False, True]),
    ("latent_sim", [0.9, 0.1, 0.5], [True, True, True]),  # all empty: by score
    ("latent_sim", [0.9, 0.1, 0.5], None),
    ("kl", [0.2, 0.2, 0.1], [False, False, False]),
]


@pytest.mark.parametrize(("rule", "scores", "empty"), EDGES)
def test_select_best_of_n_is_the_first_of_the_ranking(rule, scores, empty):
    from actors.selection import rank_candidates

    assert select_best_of_n(rule, scores, empty=empty) == rank_candidates(rule, scores, empty)[0]


def test_an_empty_candidate_loses_to_an_unscored_one():
    # the case of the issue: candidate 0 is empty, candidate 1 has no usable KL; 1 is chosen
    assert select_best_of_n("kl", [None, math.nan], empty=[True, False]) == 1


def test_empty_is_decided_from_token_ids_in_evaluation_score_and_serving(smol_tokenizer):
    """A whitespace-only response has token ids: it is a candidate like any other for the report's
    selectors, for `dabon score`'s `selected` and for serving's ranking."""
    from actors.chat import response_token_ids
    from actors.scorer import scores_row
    from pipelines.metrics import build_selectors, empty_samples

    texts = ["   ", "Sure, here it is.", ""]
    ids = [response_token_ids(smol_tokenizer, text) for text in texts]
    assert [len(i) == 0 for i in ids] == [False, False, True]  # whitespace is a token
    sims = [0.2, 0.6, 0.1]
    # evaluation rows with and without stored ids pick the same candidate
    with_ids = {"prompt_id": "p", "responses": texts, "response_ids": ids, "latent_sim_3": sims}
    without_ids = {"prompt_id": "p", "responses": texts, "latent_sim_3": sims}
    assert empty_samples(with_ids) == empty_samples(without_ids) == [False, False, True]
    selector = build_selectors(with_ids.keys(), [3])["latent_sim_3"]
    row = scores_row("p", {"latent_sim": {3: sims}}, [3], empty=[len(i) == 0 for i in ids])
    assert selector(with_ids) == selector(without_ids) == row["selected"]["3"] == 0
