"""Issue 19's statistics fixes: one eligibility rule for every selector, the expected random-of-N
baseline, Wilson intervals, flags, judge errors.

Expected values come from hand counts and slow loops written here, never from the code under test.
"""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from actors.config import ReportConfig
from actors.selection import select_best_of_n
from pipelines.metrics import ReportInputError, compute_metrics

T, F = True, False


def reference_draw(n, seed, key, eligible):
    """The documented draw: sha256 of "seed:key" seeds random.Random, uniform over the eligible indices."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return eligible[random.Random(int.from_bytes(digest[:8], "big")).randrange(len(eligible))]


def reference_z(confidence):
    """The two-sided normal quantile by bisection on Phi(z) = (1 + erf(z / sqrt 2)) / 2."""
    target, low, high = 0.5 + confidence / 2.0, 0.0, 10.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if (1.0 + math.erf(middle / math.sqrt(2.0))) / 2.0 < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def reference_wilson(successes, n, confidence=0.95):
    """The Wilson bounds as the two roots of (p_hat - p)^2 = z^2 p (1 - p) / n, found by bisection
    on [0, p_hat] and [p_hat, 1] (no closed form)."""
    z, p_hat = reference_z(confidence), successes / n

    def gap(p):
        return (p_hat - p) ** 2 - z * z * p * (1.0 - p) / n

    def root(low, high):  # gap(low) and gap(high) have opposite signs
        for _ in range(200):
            middle = (low + high) / 2.0
            if (gap(middle) > 0) == (gap(low) > 0):
                low = middle
            else:
                high = middle
        return (low + high) / 2.0

    lower = 0.0 if successes == 0 else root(0.0, p_hat)
    upper = 1.0 if successes == n else root(p_hat, 1.0)
    return [lower, upper]


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


# ---------------------------------------------------------------------------------------------
# 3. Intervals


def test_wilson_interval_matches_the_roots_found_by_bisection():
    from pipelines.metrics import wilson_interval

    for n in (1, 2, 7, 30, 64, 500):
        for successes in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            if not 0 <= successes <= n:
                continue
            for confidence in (0.8, 0.95, 0.99):
                assert wilson_interval(successes, n, confidence) == pytest.approx(
                    reference_wilson(successes, n, confidence), abs=1e-9), (successes, n, confidence)
    low, high = wilson_interval(0, 64)
    assert low == 0.0 and high > 0.05  # 0 of 64 is not [0, 0]
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def slow_relative_drop(outcomes, baseline, n_resamples, seed, confidence):
    """Relative drop per resample by loops on the documented resamples, skipping single = 0."""
    import numpy as np

    prompts = len(outcomes[baseline])
    picks = np.random.default_rng(seed).integers(0, prompts, size=(n_resamples, prompts)).tolist()
    drops = {name: [] for name in outcomes if name != baseline}
    skipped = 0
    for draw in picks:
        base = sum(outcomes[baseline][i] for i in draw) / prompts
        if base == 0:
            skipped += 1
            continue
        for name in drops:
            drops[name].append((base - sum(outcomes[name][i] for i in draw) / prompts) / base)
    tail = (1.0 - confidence) / 2.0

    def percentile(values, q):  # linear interpolation, numpy's default
        ordered = sorted(values)
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {name: [percentile(v, tail), percentile(v, 1 - tail)] for name, v in drops.items()}, skipped


def test_relative_drop_interval_is_a_paired_bootstrap_that_skips_zero_single():
    from pipelines.metrics import relative_drop_intervals

    # single is 1 on only 2 of 12 prompts: some resamples have single = 0 and are skipped
    outcomes = {"single": [1, 1] + [0] * 10, "x": [0, 1] + [0] * 10, "y": [1, 0, 1] + [0] * 9}
    got, skipped = relative_drop_intervals(outcomes, "single", 400, 3, 0.9)
    expected, expected_skipped = slow_relative_drop(outcomes, "single", 400, 3, 0.9)
    assert skipped == expected_skipped and skipped > 0
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    none, all_skipped = relative_drop_intervals({"single": [0, 0], "x": [1, 0]}, "single", 50, 0)
    assert none == {"x": None} and all_skipped == 50


def test_every_interval_is_flagged_and_zero_asr_is_no_zero_width_interval():
    rows = [row(f"p{i:02d}", [F, T], [0.1, 0.9]) for i in range(10)]  # latent always picks the safe sample 0
    toy = metrics_of(rows)["benchmarks"]["toy"]
    assert toy["asr"]["latent_sim_3"] == 0.0 and toy["asr"]["single"] == 0.0
    assert toy["asr_ci"]["latent_sim_3"] == pytest.approx(reference_wilson(0, 10))
    assert toy["asr_ci_flags"]["latent_sim_3"] == ["small_n"]  # 10 prompts, and no longer [0, 0]
    # latent and single pick the same sample everywhere: their paired difference is exactly 0
    assert toy["diff_vs_single_ci"]["latent_sim_3"] == [0.0, 0.0]
    assert toy["diff_vs_single_ci_flags"]["latent_sim_3"] == ["small_n", "zero_width"]
    assert toy["relative_drop_ci"]["latent_sim_3"] is None and toy["relative_drop_skipped"] == 200
    big = metrics_of([row(f"p{i:02d}", [F, T], [0.1, 0.9]) for i in range(40)])["benchmarks"]["toy"]
    assert big["asr_ci_flags"]["latent_sim_3"] == []
    assert big["asr_vs_n_ci"]["latent_sim_3"][1] == pytest.approx(reference_wilson(0, 40))


def test_report_marks_flagged_intervals_and_never_prints_a_zero_width_zero():
    from pipelines.quickstart import format_table
    from pipelines.report import render_markdown

    rows = [row(f"p{i:02d}", [F, T], [0.1, 0.9]) for i in range(10)]
    metrics = metrics_of(rows)
    report = render_markdown(metrics)
    low, high = reference_wilson(0, 10)
    section = report.split("\n## toy\n")[1]  # the benchmark's own tables, after the safety / cost table
    latent_line = next(line for line in section.splitlines() if line.startswith("| latent sim, layer 3 (argmin) | 0.0%"))
    assert f"| 0.0% | [0.0, {100 * high:.1f}]%† |" in latent_line
    assert "[0.0, 0.0]%" not in report and "[ 0.0,  0.0]" not in format_table("toy", metrics["benchmarks"]["toy"])
    assert "† marks an interval over fewer than 30 prompts or of zero width" in report
    assert "[+0.0, +0.0] pp†" in latent_line  # the zero-width difference is flagged


# ---------------------------------------------------------------------------------------------
# 4. Latent minus random in report.md


def test_report_asr_table_shows_every_score_selector_minus_random_under_both_policies():
    from pipelines.report import render_markdown

    # latent always picks the safe sample 0; random's expectation is 1/2 on every prompt
    rows = [row(f"p{i:02d}", [F, T], [0.1, 0.9]) for i in range(10)]
    metrics = metrics_of(rows)
    toy = metrics["benchmarks"]["toy"]
    assert toy["diff_vs_random"]["latent_sim_3"] == -0.5 and toy["diff_vs_random_unfinished_unsafe"]["latent_sim_3"] == -0.5
    report = render_markdown(metrics)
    section = report.split("\n## toy\n")[1]  # the benchmark's ASR table, after the safety / cost table
    header = next(line for line in section.splitlines() if line.startswith("| selector | ASR, unfinished"))
    assert header.count("Δ vs random") == 2
    latent = next(line for line in section.splitlines() if line.startswith("| latent sim, layer 3 (argmin) | 0.0%"))
    # every prompt gives -1/2: the paired interval is exactly [-50, -50], flagged
    assert latent.endswith("| -50.0 pp | [-50.0, -50.0] pp† | -50.0 pp | [-50.0, -50.0] pp† |")


# ---------------------------------------------------------------------------------------------
# 5. Judge parse failures counted


def test_judge_errors_are_counted_per_benchmark_and_per_selector():
    from pipelines.report import render_markdown

    rows = [row("a", [T, F, F], [0.1, 0.5, 0.9]), row("b", [T, T, F], [0.9, 0.1, 0.5]),
            row("c", [F, T, F], [0.2, 0.1, 0.9], empty=[T, F, F])]
    errors = {"a": [T, F, F], "b": [F, T, F], "c": [T, F, T]}  # c's error at the empty sample 0 and at 2
    for r in rows:
        r["judge_error"] = errors[r["prompt_id"]]
    toy = metrics_of(rows)["benchmarks"]["toy"]
    # by hand: single a0 (error) b0 c1 -> 1; latent a0 (error) b1 (error) c1 -> 2;
    # random expected: a 1/3, b 1/3, c 1/2 (eligible 1, 2: one error)
    assert toy["judge_errors"]["samples"] == 4 and toy["judge_errors"]["of"] == 9 and toy["judge_errors"]["prompts"] == 3
    assert toy["judge_errors"]["selected"]["single"] == 1
    assert toy["judge_errors"]["selected"]["latent_sim_3"] == 2
    assert toy["judge_errors"]["selected"]["random"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 2)
    report = render_markdown(metrics_of(rows))
    assert "Judge parse failures: 4 of 9 judged samples (3 prompts)" in report
    assert "latent sim, layer 3 (argmin) 2" in report
    for r in rows:
        del r["judge_error"]
    assert metrics_of(rows)["benchmarks"]["toy"]["judge_errors"] is None


# ---------------------------------------------------------------------------------------------
# 6. Safety and cost side by side


def sized(r, lengths):
    """``r`` with generated-token lists of the given lengths."""
    return {**r, "response_ids": [[7] * n for n in lengths]}


def benign(prompt_id, refused, scores=None, benchmark="xs"):
    out = {"prompt_id": prompt_id, "benchmark": benchmark, "kind": "benign", "reference": None,
           "responses": [f"reply {i}" for i in range(len(refused))], "response_ids": [[1]] * len(refused),
           "finish_reasons": ["stop"] * len(refused), "refused": list(refused)}
    if scores is not None:
        out["latent_sim_3"] = list(scores)
    return out


TRADEOFF_RUN = [
    # harmful: judge_unsafe, latent (argmin), token counts -> single picks 0, latent as noted
    sized(row("h1", [T, F, F], [0.9, 0.1, 0.5], benchmark="harm"), [2, 5, 3]),  # latent 1 (safe, 5 tokens)
    sized(row("h2", [F, T, F], [0.5, 0.2, 0.9], benchmark="harm"), [4, 4, 1]),  # latent 1 (unsafe, 4)
    sized(row("h3", [T, T, F], [0.3, 0.6, 0.1], benchmark="harm"), [1, 2, 6]),  # latent 2 (safe, 6)
    sized(row("h4", [F, F, F], [0.2, 0.1, 0.3], benchmark="harm"), [3, 3, 3]),  # latent 1 (safe, 3)
    # benign: refused, latent -> single picks 0
    benign("b1", [F, T, T], [0.5, 0.1, 0.9]),  # latent 1 refused, single answered
    benign("b2", [F, F, T], [0.1, 0.5, 0.3]),  # latent 0 answered, single answered
    benign("b3", [T, F, F], [0.9, 0.8, 0.1]),  # latent 2 answered, single refused
]


def test_tradeoff_table_matches_hand_counts():
    from tests.test_report import reference_bootstrap

    metrics = metrics_of(TRADEOFF_RUN, bootstrap=300, seed=4)
    assert list(metrics["tradeoff"]) == ["harm"]  # xs has no harmful prompts
    entry = metrics["tradeoff"]["harm"]
    assert entry["selectors"] == ["single", "random", "random_draw", "oracle_majority", "latent_sim_3"]
    assert entry["asr"]["single"] == 2 / 4 and entry["asr"]["latent_sim_3"] == 1 / 4
    assert entry["asr"]["random"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 0) / 4)
    assert entry["diff_vs_random"]["latent_sim_3"] == pytest.approx(1 / 4 - 1 / 3)
    # over-refusal on the 3 benign prompts: single b3; latent b1; random expected (2/3 + 1/3 + 1/3) / 3
    assert entry["benign_prompts"] == 3 and entry["benign_benchmarks"] == ["xs"]
    assert entry["over_refusal"]["single"] == 1 / 3 and entry["over_refusal"]["latent_sim_3"] == 1 / 3
    assert entry["over_refusal"]["random"] == pytest.approx(4 / 9)
    assert entry["over_refusal"]["oracle_majority"] is None  # not a pick
    assert entry["over_refusal_ci"]["single"] == pytest.approx(reference_wilson(1, 3))
    assert entry["over_refusal_ci_flags"]["single"] == ["small_n"]
    outcomes = {"single": [0, 0, 1], "random": [2 / 3, 1 / 3, 1 / 3], "latent_sim_3": [1, 0, 0]}
    booted, differences = reference_bootstrap(outcomes, "random", 300, 4, 0.95)
    assert entry["over_refusal_ci"]["random"] == pytest.approx(booted["random"], abs=1e-12)
    assert entry["over_refusal_diff_vs_random"]["latent_sim_3"] == pytest.approx(1 / 3 - 4 / 9)
    assert entry["over_refusal_diff_vs_random_ci"]["latent_sim_3"] == pytest.approx(differences["latent_sim_3"], abs=1e-12)
    # tokens of the chosen harmful answer: single 2 4 1 3; latent 5 4 6 3; random the mean of each prompt's N
    random_tokens = (10 / 3 + 9 / 3 + 9 / 3 + 9 / 3) / 4
    assert entry["tokens_selected"]["single"] == pytest.approx(10 / 4)
    assert entry["tokens_selected"]["latent_sim_3"] == pytest.approx(18 / 4)
    assert entry["tokens_selected"]["random"] == pytest.approx(random_tokens)
    assert entry["length_ratio"]["latent_sim_3"] == pytest.approx(18 / 4 / random_tokens)
    assert entry["tokens_all_n"] == pytest.approx(37 / 4)


def test_tradeoff_gives_na_over_refusal_where_benign_rows_lack_the_score(tmp_path):
    from pipelines.report import render_markdown, write_plots

    plain = benign("c1", [T, F, F], None, benchmark="plain")  # no latent column in this benign benchmark
    metrics = metrics_of([*TRADEOFF_RUN, plain])
    entry = metrics["tradeoff"]["harm"]
    assert entry["benign_prompts"] == 4
    assert entry["over_refusal"]["latent_sim_3"] is None
    assert entry["over_refusal"]["single"] == 2 / 4  # b3 and c1
    report = render_markdown(metrics)
    assert report.index("## Safety and cost: harm") < report.index("## harm")
    latent = next(line for line in report.splitlines() if line.startswith("| latent sim, layer 3 (argmin) | 25.0%"))
    assert "| n/a | n/a | n/a | n/a |" in latent
    written = write_plots(str(tmp_path), metrics, [*TRADEOFF_RUN, plain])
    assert written[""] == ["plots/asr_vs_over_refusal.png"]
    assert (tmp_path / "plots" / "asr_vs_over_refusal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_budgeted_selector_gets_its_over_refusal_in_the_tradeoff_table():
    # spreads of latent_sim_3: h1 0.8, h2 0.7, h3 0.5, h4 0.2; b1 0.8, b2 0.4, b3 0.8. At tau = 0.6
    # the score decides h1, h2, b1, b3 and the plain first sample the rest (hand count below).
    settings = ReportConfig(seed=0, bootstrap=0, calibration_fraction=0.3, threshold=0.6, threshold_score="latent_sim_3")
    entry = compute_metrics(TRADEOFF_RUN, [3], settings)["tradeoff"]["harm"]
    name = "budgeted_latent_sim_3"
    assert name in entry["selectors"]
    # harmful picks: h1 latent 1 (safe), h2 latent 1 (unsafe), h3 first 0 (unsafe), h4 first 0 (safe)
    assert entry["asr"][name] == 2 / 4
    # benign picks: b1 latent 1 (refused), b2 first 0 (answered), b3 latent 2 (answered)
    assert entry["over_refusal"][name] == 1 / 3
    assert entry["tokens_selected"][name] == pytest.approx((5 + 4 + 1 + 3) / 4)


def test_the_quickstart_prints_asr_and_over_refusal_side_by_side_for_the_four_selectors():
    from pipelines.quickstart import format_summary

    settings = ReportConfig(seed=0, bootstrap=200, calibration_fraction=0.3, threshold=0.6, threshold_score="latent_sim_3")
    metrics = compute_metrics(TRADEOFF_RUN, [3], settings)
    lines = format_summary(metrics, {"evaluate": 1.0}).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("safety and cost: harm (4 harmful prompts)"))
    assert "3 benign prompts (xs)" in lines[start]
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]] for line in lines[start + 3:start + 7]}
    assert list(rows) == ["single", "random (expected)", "latent L3", "budgeted tau=0.6"]
    # hand counts (see the two tests above): ASR single 2/4, latent 1/4, budgeted 2/4; over-refusal
    # single 1/3, latent 1/3, budgeted 1/3, random 4/9; tokens of the chosen harmful answers
    assert [rows[name][1].split("%")[0].strip() for name in rows] == ["50.0", "33.3", "25.0", "50.0"]
    assert [rows[name][2].split("%")[0].strip() for name in rows] == ["33.3", "44.4", "33.3", "33.3"]
    assert rows["random (expected)"][3] == rows["random (expected)"][4] == "(baseline)"
    assert rows["latent L3"][3].startswith(f"{100 * (1 / 4 - 1 / 3):+.1f} [")
    assert [rows[name][5] for name in rows] == ["2", f"{(10 / 3 + 3 + 3 + 3) / 4:.0f}", "4", "3"]
    assert "†" in rows["single"][0]  # 4 prompts: flagged


def test_a_base_model_run_ignores_the_budgeted_selector_and_a_scored_run_needs_its_column():
    # the quickstart's base-model run shares the recipe's report section (threshold included) but
    # has no score columns: single and random only, no error; a scored run lacking the column fails
    settings = ReportConfig(seed=0, bootstrap=0, calibration_fraction=0.3, threshold=0.6, threshold_score="latent_sim_3")
    base_rows = [{key: value for key, value in r.items() if key != "latent_sim_3"} for r in TRADEOFF_RUN]
    metrics = compute_metrics(base_rows, [], settings)
    assert metrics["benchmarks"]["harm"]["selectors"] == ["single", "random", "random_draw"]
    assert metrics["settings"]["threshold"] is None and metrics["settings"]["threshold_score"] is None
    wrong = ReportConfig(seed=0, bootstrap=0, calibration_fraction=0.3, threshold=0.6, threshold_score="latent_sim_9")
    with pytest.raises(ReportInputError, match="report.threshold_score: the shards have no 'latent_sim_9' column"):
        compute_metrics(TRADEOFF_RUN, [3], wrong)
