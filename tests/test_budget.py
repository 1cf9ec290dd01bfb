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


# ---------------------------------------------------------------------------------------------
# Serving and `dabon score` apply the same rule


def test_serving_config_takes_a_threshold_and_refuses_a_bad_one():
    from actors.config import ConfigError
    from tests.test_serve_logic import config

    assert config().scoring.threshold is None
    assert config(scoring={"threshold": 0.25}).scoring.threshold == 0.25
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ConfigError, match=r"scoring\.threshold: expected a finite number >= 0"):
            config(scoring={"threshold": bad})
    with pytest.raises(ConfigError, match=r"scoring\.threshold"):
        config(scoring={"threshold": "wide"})


def test_dabon_serve_set_applies_the_threshold():
    from actors.config import read_yaml
    from pipelines.serve import DEFAULT_CONFIG, app_args, select_application
    from serve_app.app import parse_app_config
    from tests.test_serve_logic import serve_args

    application = select_application(read_yaml(DEFAULT_CONFIG), None)
    data = app_args(application, serve_args("--adapter", "/a", "--set", "scoring.threshold=0.03"))
    assert parse_app_config(data).scoring.threshold == 0.03


def test_the_served_answer_follows_the_budgeted_rule_and_says_who_decided(smol_tokenizer):
    from tests.test_serve_logic import FakeModels, chat, service

    scores = [0.9, 0.2, 0.7]  # spread 0.7
    plain = service(smol_tokenizer, FakeModels(scores=scores))
    out = chat(plain, dabon={"return_candidates": True})
    assert (out["dabon"]["selected"], out["dabon"]["threshold"], out["dabon"]["decided_by"]) == (1, None, None)
    wide = chat(service(smol_tokenizer, FakeModels(scores=scores), scoring={"threshold": 0.7}), n=3,
                dabon={"return_candidates": True})
    assert (wide["dabon"]["ranking"], wide["dabon"]["threshold"], wide["dabon"]["decided_by"]) == ([1, 2, 0], 0.7, "score")
    assert wide["choices"][0]["message"]["content"] == "answer 1"
    narrow = chat(service(smol_tokenizer, FakeModels(scores=scores), scoring={"threshold": 0.71}), n=3,
                  dabon={"return_candidates": True})
    assert (narrow["dabon"]["ranking"], narrow["dabon"]["decided_by"]) == ([0, 1, 2], "plain")
    assert narrow["choices"][0]["message"]["content"] == "answer 0"
    # the plain sample is the first non-empty candidate; the empty one's low score does not count
    empty_first = FakeModels(scores=[0.0, 0.5, 0.45], token_ids=[[], [8], [9]])
    out = chat(service(smol_tokenizer, empty_first, scoring={"threshold": 0.1}), dabon={"return_candidates": True})
    assert (out["dabon"]["selected"], out["dabon"]["decided_by"]) == (1, "plain")


def test_the_scoring_route_reports_the_budgeted_choice(smol_tokenizer):
    import asyncio

    from tests.test_serve_logic import FakeModels, service

    svc = service(smol_tokenizer, FakeModels(scores=[0.3, 0.1]), scoring={"layer": 7, "threshold": 0.25})
    out = asyncio.run(svc.score(json.dumps({"id": "q", "prompt": "Hello", "responses": ["A", "B"]}).encode()))
    assert out == {"id": "q", "latent_sim": {"7": [0.3, 0.1]}, "selected": {"7": 0}, "threshold": 0.25,
                   "decided_by": {"7": "plain"}}


def test_dabon_score_threshold_matches_the_slow_reference(tmp_path, tiny_models):
    import subprocess
    import sys

    from pipelines.cli import main
    from tests.test_score_cli import ROWS, read_jsonl, score_args, write_jsonl

    write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "plain.jsonl")) == 0
    plain = read_jsonl(tmp_path / "plain.jsonl")
    # a threshold between the spreads of the rows (row "a" has an empty response: not eligible)
    spreads = []
    for row, out in zip(ROWS, plain):
        for layer in ("2", "4"):
            values = [v for v, text in zip(out["latent_sim"][layer], row["responses"]) if text != "" and v is not None]
            spreads.append(max(values) - min(values))
    threshold = sorted(spreads)[len(spreads) // 2]
    assert main(score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "budget.jsonl", "--threshold", str(threshold))) == 0
    budget = read_jsonl(tmp_path / "budget.jsonl")
    decided = set()
    for row, out, base in zip(ROWS, budget, plain):
        assert out["threshold"] == threshold
        empty = [text == "" for text in row["responses"]]
        for layer in ("2", "4"):
            index, _, who = slow_budgeted("latent_sim", out["latent_sim"][layer], empty, threshold)
            assert (out["selected"][layer], out["decided_by"][layer]) == (index, who)
            decided.add(who)
            if who == "score":
                assert out["selected"][layer] == base["selected"][layer]
    assert decided == {"score", "plain"}
    result = subprocess.run([sys.executable, "-m", "pipelines.cli",
                             *score_args(tiny_models, tmp_path / "in.jsonl", tmp_path / "bad.jsonl", "--threshold", "-1")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--threshold: expected a finite number >= 0" in result.stderr
    assert "Traceback" not in result.stderr
