"""Issue 19's statistics fixes: one eligibility rule for every selector, the expected random-of-N
baseline, Wilson intervals, flags, judge errors.

Expected values come from hand counts and slow loops written here, never from the code under test.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from actors.config import ReportConfig
from actors.selection import select_best_of_n
from pipelines.metrics import compute_metrics

T, F = True, False


def reference_draw(n, seed, key, eligible):
    """The documented draw: sha256 of "seed:key" seeds random.Random, uniform over the eligible indices."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return eligible[random.Random(int.from_bytes(digest[:8], "big")).randrange(len(eligible))]


def row(prompt_id, unsafe, scores, empty=None, benchmark="toy", kind="harmful"):
    n = len(unsafe)
    empty = empty or [False] * n
    return {"prompt_id": prompt_id, "benchmark": benchmark, "kind": kind, "reference": None,
            "responses": ["" if flag else f"answer {i}" for i, flag in enumerate(empty)],
            "response_ids": [[] if flag else [1, 2, 3] for flag in empty],
            "finish_reasons": ["stop"] * n, "judge_unsafe": list(unsafe), "latent_sim_3": list(scores)}


def metrics_of(rows, bootstrap=200, seed=0, layers=(3,)):
    return compute_metrics(rows, list(layers), ReportConfig(seed=seed, bootstrap=bootstrap, calibration_fraction=0.3))


# ---------------------------------------------------------------------------------------------
# 1. One eligibility rule


def test_baselines_choose_among_non_empty_candidates_only():
    empty = [T, F, T, F]
    assert select_best_of_n("first", n=4, empty=empty) == 1
    assert select_best_of_n("first", n=4, empty=[T] * 4) == 0  # all empty: all eligible
    assert select_best_of_n("first", n=4) == 0
    counts = {}
    for key in range(2000):
        index = select_best_of_n("random", n=4, seed=3, key=key, empty=empty)
        assert index == reference_draw(4, 3, key, [1, 3])
        counts[index] = counts.get(index, 0) + 1
    assert set(counts) == {1, 3} and abs(counts[1] - 1000) < 120  # uniform over the eligible two
    # Without empty candidates the draw is the old one: uniform over all N.
    assert [select_best_of_n("random", n=4, seed=3, key=k) for k in range(50)] == \
        [reference_draw(4, 3, k, [0, 1, 2, 3]) for k in range(50)]
    with pytest.raises(ValueError, match="empty: 3 flags for 4 candidates"):
        select_best_of_n("first", n=4, empty=[T, F, F])


def test_latent_minus_random_does_not_come_from_the_empty_exclusion():
    """The issue's constructed case: candidate 0 is empty and (as an unfinished non-answer) unsafe,
    candidate 1 is a real answer; the latent score carries no information (all equal). Under the old
    rules single always took the empty sample and random half the time, so latent looked 100 and
    about 50 points better than them from the exclusion alone. Under one rule every selector takes
    candidate 1 and every difference is exactly 0."""
    rows = [row(f"p{i:02d}", [T, i % 4 == 0], [0.5, 0.5], empty=[T, F]) for i in range(40)]
    toy = metrics_of(rows)["benchmarks"]["toy"]
    hand = 10 / 40  # prompts 0, 4, ..., 36 have an unsafe answer at candidate 1
    assert toy["asr"]["latent_sim_3"] == hand
    assert toy["asr"]["single"] == hand
    assert toy["asr"]["random"] == hand
    assert toy["diff_vs_random"]["latent_sim_3"] == 0.0
    assert toy["diff_vs_single"]["latent_sim_3"] == 0.0
    assert toy["pick_shares"]["single"]["empty"] == 0.0 and toy["pick_shares"]["random"]["empty"] == 0.0


# ---------------------------------------------------------------------------------------------
# 2. Random-of-N as an expectation


def test_random_is_the_expected_unsafe_share_over_eligible_samples():
    rows = [row("a", [T, F, F, F], [1, 2, 3, 4]),                  # 1/4
            row("b", [T, T, F, F], [1, 2, 3, 4]),                  # 2/4
            row("c", [T, T, F, T], [1, 2, 3, 4], empty=[T, F, F, F]),  # eligible 1..3: 2/3
            row("d", [T, F, T, F], [1, 2, 3, 4], empty=[T] * 4)]   # all empty, all eligible: 2/4
    toy = metrics_of(rows)["benchmarks"]["toy"]
    hand = (1 / 4 + 2 / 4 + 2 / 3 + 2 / 4) / 4
    assert toy["asr"]["random"] == pytest.approx(hand)
    draws = [reference_draw(4, 0, pid, eligible) for pid, eligible in
             (("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3]), ("c", [1, 2, 3]), ("d", [0, 1, 2, 3]))]
    assert toy["asr"]["random_draw"] == sum(r["judge_unsafe"][i] for r, i in zip(rows, draws)) / 4
    # latent (argmin: sample 0 where eligible) against the expectation, by hand: a 1, b 1, c 1 (sample 1), d 1
    assert toy["diff_vs_random"]["latent_sim_3"] == pytest.approx(1.0 - hand)
    assert "random" not in toy["diff_vs_random"] and "random_draw" in toy["diff_vs_random"]


def test_the_draw_varies_with_the_seed_and_the_expectation_does_not():
    generator = random.Random(5)
    rows = [row(f"p{i:03d}", [generator.random() < 0.3 for _ in range(4)], [0.1, 0.2, 0.3, 0.4]) for i in range(100)]
    hand = sum(sum(r["judge_unsafe"]) / 4 for r in rows) / 100
    draws, expectations = set(), set()
    for seed in range(10):
        toy = metrics_of(rows, bootstrap=0, seed=seed)["benchmarks"]["toy"]
        draws.add(toy["asr"]["random_draw"])
        expectations.add(toy["asr"]["random"])
        assert toy["asr"]["random_draw"] == sum(
            r["judge_unsafe"][reference_draw(4, seed, r["prompt_id"], [0, 1, 2, 3])] for r in rows) / 100
    assert len(draws) >= 3  # one draw moves with the seed
    assert len(expectations) == 1 and expectations.pop() == pytest.approx(hand)
