"""Detector quality within a prompt (pipelines.detector): every number against a hand count on a
small table, the AUROC against a slow double loop on a random table, the interval against a
slow resampling loop, and the numbers compute_metrics / report.md carry."""

from __future__ import annotations

import random

import numpy as np
import pytest

from actors.config import ReportConfig
from pipelines.detector import (
    asr_by_category,
    detector_metrics,
    detector_quality,
    markdown_lines,
    outcome_mix,
    pair_credit,
    ratio_interval,
    within_prompt_auroc,
)
from pipelines.metrics import ReportInputError, build_selectors, compute_metrics, normalise_rows
from tests.test_report import reference_percentile

F, T = False, True
OPEN = "<think>\nstill thinking"  # a reasoning opened and never closed: unfinished


def hand_table():
    """Five judged harmful prompts and two benign ones, N = 4; ``latent_sim_2`` (argmin) and ``kl``
    (argmax). "" is an empty sample (no generated token)."""
    harmful = [
        {"prompt_id": "h1", "responses": ["a", "b", "c", "d"], "judge_unsafe": [F, T, F, T],
         "latent_sim_2": [0.1, 0.5, 0.5, 0.3], "kl": [1.0, 2.0, None, 0.5], "categories": ["A"]},
        {"prompt_id": "h2", "responses": ["x", "", "y", "z"], "judge_unsafe": [T, F, T, T],
         "latent_sim_2": [0.2, 0.0, 0.4, 0.9], "kl": [0.1, 0.2, 0.3, 0.4], "categories": ["A", "B"]},
        {"prompt_id": "h3", "responses": [OPEN, "q", "r", "s"], "judge_unsafe": [F, F, F, F],
         "latent_sim_2": [0.3, 0.3, 0.3, 0.3], "kl": [0.1, 0.1, 0.1, 0.1], "categories": ["B"]},
        {"prompt_id": "h4", "responses": ["u", "v", OPEN, "w"], "judge_unsafe": [F, T, F, F],
         "latent_sim_2": [0.6, 0.2, 0.1, 0.7], "kl": [0.5, 0.5, 0.9, 0.6], "categories": []},
        {"prompt_id": "h5", "responses": ["", "", "", ""], "judge_unsafe": [F, F, F, F],
         "latent_sim_2": [0.0, 0.0, 0.0, 0.0], "kl": [None, None, None, None], "categories": ["A"]},
    ]
    benign = [
        {"prompt_id": "b1", "responses": ["ok", "no", "ok2", "no2"], "refused": [F, T, F, T],
         "latent_sim_2": [0.5, 0.1, 0.6, 0.2], "kl": [1.0, 2.0, 3.0, 4.0], "categories": []},
        # b1's second sample: unfinished, so refused whatever `refused` says; the fourth is empty
        {"prompt_id": "b2", "responses": ["a", OPEN, "b", ""], "refused": [F, F, T, F],
         "latent_sim_2": [0.15, 0.1, 0.2, 0.0], "kl": [0.5, 0.5, None, 0.1], "categories": []},
    ]
    for row in harmful:
        row.update(benchmark="toy", kind="harmful")
    for row in benign:
        row.update(benchmark="toy", kind="benign")
    return harmful, benign


# Hand counts (see hand_table):
# latent_sim_2 (argmin), safety: h1 safe {0.1, 0.5} vs unsafe {0.5, 0.3}: 1 + 1 + 0.5 + 0 = 2.5 of 4;
#   h2: the only safe sample is empty (not eligible): no pair; h3: no unsafe: no pair;
#   h4 safe {0.6, 0.1, 0.7} vs unsafe {0.2}: 0 + 1 + 0 = 1 of 3; h5 all empty. -> 3.5 / 7, 2 prompts.
# kl (argmax), safety: h1 safe {1.0} (the third is unscored) vs unsafe {2.0, 0.5}: 0 + 1 = 1 of 2;
#   h4 safe {0.5, 0.9, 0.6} vs unsafe {0.5}: 0.5 + 1 + 1 = 2.5 of 3. -> 3.5 / 5, 2 prompts.
# latent_sim_2, refusal: b1 answered {0.5, 0.6} vs refused {0.1, 0.2}: 0 of 4 (argmin prefers refusals);
#   b2 answered {0.15} vs refused {0.1 (unfinished), 0.2} (the fourth is empty): 0 + 1 = 1 of 2. -> 1 / 6.
# kl, refusal: b1 answered {1, 3} vs refused {2, 4}: 0 + 0 + 1 + 0 = 1 of 4; b2 answered {0.5} vs
#   refused {0.5} (the third unscored, the fourth empty): 0.5 of 1. -> 1.5 / 5.
HAND = {
    "latent_sim_2": {"safety": (3.5 / 7, 7, 2), "refusal": (1 / 6, 6, 2)},
    "kl": {"safety": (3.5 / 5, 5, 2), "refusal": (1.5 / 5, 5, 2)},
}
# Mix of the non-empty samples: h1 mixed, h2 all unsafe, h3 all safe, h4 mixed, h5 none;
# with unfinished counted unsafe h3 (first sample unfinished) becomes mixed.
HAND_MIX = {"judge": {"mixed": 2, "all_unsafe": 1, "all_safe": 1, "no_sample": 1},
            "unfinished_unsafe": {"mixed": 3, "all_unsafe": 1, "all_safe": 0, "no_sample": 1}}
# Chosen samples: single = the first; latent argmin skipping empties: h1 0 (safe), h2 0 (unsafe),
# h3 0 (safe; unfinished), h4 2 (safe; unfinished), h5 0 (all empty; safe). Oracle (> half unsafe):
# only h2. Categories: A = {h1, h2, h5}, B = {h2, h3}, none = {h4}.
HAND_CATEGORIES = {
    "A": {"prompts": 3, "unsafe": {"single": 1, "latent_sim_2": 1, "oracle_majority": 1},
          "unsafe_unfinished_unsafe": {"single": 1, "latent_sim_2": 1, "oracle_majority": 1}},
    "B": {"prompts": 2, "unsafe": {"single": 1, "latent_sim_2": 1, "oracle_majority": 1},
          "unsafe_unfinished_unsafe": {"single": 2, "latent_sim_2": 2, "oracle_majority": 1}},
    "(none)": {"prompts": 1, "unsafe": {"single": 0, "latent_sim_2": 0, "oracle_majority": 0},
               "unsafe_unfinished_unsafe": {"single": 0, "latent_sim_2": 1, "oracle_majority": 0}},
}


def test_pair_credit_counts_wins_and_half_ties():
    assert pair_credit([0.1, 0.5], [0.5, 0.3], "min") == (2.5, 4)
    assert pair_credit([0.1, 0.5], [0.5, 0.3], "max") == (0.5 + 1.0, 4)
    with pytest.raises(ValueError, match="direction"):
        pair_credit([1.0], [2.0], "up")


def test_detector_numbers_match_the_hand_count():
    harmful, benign = hand_table()
    harmful, benign = normalise_rows(harmful), normalise_rows(benign)
    selectors = build_selectors({key for row in harmful for key in row}, [2])
    selectors = {name: selectors[name] for name in ("single", "latent_sim_2")}
    result = detector_quality(harmful, benign, ["latent_sim_2", "kl"], selectors, bootstrap=0, seed=0, confidence=0.95)
    for column, sides in HAND.items():
        for side, (auroc, pairs, prompts) in sides.items():
            got = result["scores"][column][side]
            assert got["auroc"] == pytest.approx(auroc, abs=1e-12), (column, side)
            assert (got["pairs"], got["prompts"], got["ci"]) == (pairs, prompts, None), (column, side)
    assert result["scores"]["latent_sim_2"]["direction"] == "min" and result["scores"]["kl"]["direction"] == "max"
    for policy, counts in HAND_MIX.items():
        assert result["mix"][policy]["counts"] == counts
        assert result["mix"][policy]["shares"] == {key: count / 5 for key, count in counts.items()}
        assert result["mix"][policy]["prompts"] == 5
    categories = result["categories"]
    assert list(categories) == ["(none)", "A", "B"]
    for category, expected in HAND_CATEGORIES.items():
        got = categories[category]
        assert got["prompts"] == expected["prompts"]
        for key in ("unsafe", "unsafe_unfinished_unsafe"):
            assert got[key] == expected[key], (category, key)
            rates = got["asr" + key[len("unsafe"):]]
            assert rates == {name: count / expected["prompts"] for name, count in expected[key].items()}


def test_refusal_needs_a_refusal_rule_and_the_keyword_rule_reads_the_final_answer():
    harmful, benign = hand_table()
    benign = normalise_rows([{k: v for k, v in row.items() if k != "refused"} for row in benign])
    result = detector_quality([], benign, ["latent_sim_2"], {}, bootstrap=0, seed=0, confidence=0.95)
    assert result["scores"]["latent_sim_2"]["refusal"] is None and "is_refusal" in result["refusal_note"]
    assert "mix" not in result
    # a refusal rule on the final answer: "no..." refuses. b1: answered {ok 0.5, ok2 0.6} vs refused
    # {no 0.1, no2 0.2}: 0 of 4; b2: answered {a 0.15, b 0.2} vs refused {unfinished 0.1}: 0 + 0 of 2.
    result = detector_quality([], benign, ["latent_sim_2"], {}, bootstrap=0, seed=0, confidence=0.95,
                              is_refusal=lambda answer: answer.startswith("no"))
    assert result["scores"]["latent_sim_2"]["refusal"] == {"auroc": 0.0, "ci": None, "pairs": 6, "prompts": 2}


def test_categories_absent_and_bad_columns():
    harmful, _ = hand_table()
    rows = normalise_rows([{k: v for k, v in row.items() if k != "categories"} for row in harmful])
    assert asr_by_category(rows, {"single": lambda row: 0}) is None
    assert outcome_mix([])["shares"]["mixed"] is None
    bad = dict(rows[0], latent_sim_2=None)
    with pytest.raises(ReportInputError, match="latent_sim_2"):
        within_prompt_auroc([bad], "latent_sim_2", lambda row: [True] * 4, 0, 0, 0.95)
    with pytest.raises(ReportInputError, match="no registered score"):
        within_prompt_auroc(rows, "responses", lambda row: [True] * 4, 0, 0, 0.95)


def random_rows(prompts=40, samples=6, seed=3):
    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        rows.append({
            "prompt_id": f"p{i:03d}", "benchmark": "rand", "kind": "harmful",
            "responses": ["" if rng.random() < 0.1 else f"r{j}" for j in range(samples)],
            "judge_unsafe": [rng.random() < 0.4 for _ in range(samples)],
            # rounded so that ties occur; some unscored
            "latent_sim_3": [None if rng.random() < 0.1 else round(rng.random(), 1) for _ in range(samples)],
        })
    return rows


def slow_prompt_pairs(row, column, direction):
    """(credit, pairs) of one prompt by a double loop over its samples."""
    credit, pairs = 0.0, 0
    for i in range(len(row["responses"])):
        for j in range(len(row["responses"])):
            a, b = row[column][i], row[column][j]
            if row["responses"][i] == "" or row["responses"][j] == "" or a is None or b is None:
                continue
            if row["judge_unsafe"][i] or not row["judge_unsafe"][j]:
                continue  # i must be safe, j unsafe
            pairs += 1
            if a == b:
                credit += 0.5
            elif (a < b) == (direction == "min"):
                credit += 1.0
    return credit, pairs


def test_auroc_and_interval_match_slow_loops_on_a_random_table():
    rows = random_rows()
    per_prompt = [slow_prompt_pairs(row, "latent_sim_3", "min") for row in rows]
    per_prompt = [pair for pair in per_prompt if pair[1] > 0]
    credit, pairs = sum(c for c, _ in per_prompt), sum(p for _, p in per_prompt)
    got = within_prompt_auroc(rows, "latent_sim_3", lambda row: [not u for u in row["judge_unsafe"]], 300, 5, 0.9)
    assert got["auroc"] == pytest.approx(credit / pairs, abs=1e-12)
    assert (got["pairs"], got["prompts"]) == (pairs, len(per_prompt))
    # the interval: a loop over resamples of the contributing prompts (the documented draws)
    draws = np.random.default_rng(5).integers(0, len(per_prompt), size=(300, len(per_prompt))).tolist()
    ratios = []
    for draw in draws:
        total_credit = total_pairs = 0.0
        for prompt in draw:
            total_credit += per_prompt[prompt][0]
            total_pairs += per_prompt[prompt][1]
        ratios.append(total_credit / total_pairs)
    expected = [reference_percentile(ratios, 5.0), reference_percentile(ratios, 95.0)]
    assert got["ci"] == pytest.approx(expected, abs=1e-12)
    assert got["ci"][0] <= got["auroc"] <= got["ci"][1]
    # argmax reverses every strict win and keeps ties: auroc(max) = 1 - auroc(min)
    flipped = [dict(row, kl=row["latent_sim_3"]) for row in rows]
    reverse = within_prompt_auroc(flipped, "kl", lambda row: [not u for u in row["judge_unsafe"]], 0, 5, 0.9)
    assert reverse["auroc"] == pytest.approx(1.0 - got["auroc"], abs=1e-12)


def test_ratio_interval_edges():
    assert ratio_interval(np.array([]), np.array([], dtype=np.int64), 100, 0, 0.95) is None
    assert ratio_interval(np.array([1.0]), np.array([2]), 0, 0, 0.95) is None
    assert ratio_interval(np.array([1.0]), np.array([2]), 50, 0, 0.95) == [0.5, 0.5]


def with_detector(rows, layers, report):
    """What build_report computes: compute_metrics, then each benchmark's detector numbers."""
    metrics = compute_metrics(rows, layers, report)
    for bench, detector in detector_metrics(rows, layers, report).items():
        metrics["benchmarks"][bench]["detector"] = detector
    return metrics


def test_detector_metrics_per_benchmark_and_the_report_shows_them():
    harmful, benign = hand_table()
    other = [dict(row, benchmark="other") for row in harmful[:2]]
    assert sorted(detector_metrics(harmful + benign + other, [2])) == ["other", "toy"]
    metrics = with_detector(harmful + benign, [2], ReportConfig(bootstrap=200, seed=1))
    detector = metrics["benchmarks"]["toy"]["detector"]
    for column, sides in HAND.items():
        for side, (auroc, pairs, prompts) in sides.items():
            got = detector["scores"][column][side]
            assert (got["auroc"], got["pairs"], got["prompts"]) == (pytest.approx(auroc), pairs, prompts)
            assert got["ci"][0] <= got["auroc"] <= got["ci"][1]
    assert detector["mix"]["judge"]["counts"] == HAND_MIX["judge"]
    assert detector["categories"]["B"]["unsafe"]["single"] == 1
    assert "random" in detector["categories"]["B"]["unsafe"]
    from pipelines.report import render_markdown

    text = render_markdown(metrics)
    assert "### Detector quality within a prompt" in text
    assert "| latent sim, layer 2 (argmin) | 0.500 [" in text
    assert "| unfinished = unsafe | 5 | 60.0% (3) | 20.0% (1) | 0.0% (0) | 20.0% (1) |" in text
    assert "| B | 2 | 50.0% (1/2) |" in text
    lines = markdown_lines(detector, {}, 0.95)
    assert any(line.startswith("| kl | 0.700 [") and line.endswith("| 5 | 2 |") for line in lines)


def test_build_report_stores_the_detector_numbers_and_draws_the_auroc_by_layer_plot(tmp_path):
    import json

    import pandas as pd

    from pipelines.report import build_report

    harmful, benign = hand_table()
    (tmp_path / "samples").mkdir()
    pd.DataFrame(harmful + benign).to_parquet(tmp_path / "samples" / "toy-0.parquet")
    metrics = build_report(str(tmp_path), [2], ReportConfig(bootstrap=50))
    stored = json.loads((tmp_path / "metrics.json").read_text())["benchmarks"]["toy"]["detector"]
    assert stored["scores"]["kl"]["safety"]["pairs"] == 5 and stored["mix"]["judge"]["counts"] == HAND_MIX["judge"]
    assert metrics["benchmarks"]["toy"]["detector"]["scores"]["latent_sim_2"]["refusal"]["pairs"] == 6
    plot = tmp_path / "plots" / "toy" / "detector_auroc_by_layer.png"
    assert plot.stat().st_size > 1000
    text = (tmp_path / "report.md").read_text()
    assert "plots/toy/detector_auroc_by_layer.png" in text and "### Detector quality within a prompt" in text


def test_the_section_flags_auroc_intervals_over_few_prompts_or_of_zero_width():
    entry = {"scores": {"latent_sim_6": {
        "safety": {"auroc": 0.5, "ci": [0.25, 0.75], "pairs": 300, "prompts": 40},
        "refusal": {"auroc": 1.0, "ci": [1.0, 1.0], "pairs": 6, "prompts": 2}}}}
    row = next(line for line in markdown_lines(entry, {}) if line.startswith("| latent_sim_6"))
    assert "0.500 [0.250, 0.750] |" in row and "1.000 [1.000, 1.000]† |" in row
    assert any(line.startswith("† fewer than 30 prompts") for line in markdown_lines(entry, {}))
