"""``dabon budget``: the threshold of the budgeted selector for an over-refusal budget, from an evaluation run.

Launch::

    dabon budget --run runs/eval-qwen-0.5b --budget 0.02                       # latent_sim, the run's first layer
    dabon budget --run runs/eval-qwen-0.5b --budget 0.02 --score latent_sim_6 --benchmarks xstest,jbb_dev
    python -m pipelines.budget --run runs/eval-qwen-0.5b --budget 0.02 --split calibration

The budgeted selector (``actors.selection.budgeted_choice``) keeps a score rule's choice where the
score's spread (max - min over the eligible candidates: scored, non-empty) is at least a
threshold tau, and otherwise returns the plain sample (the first non-empty candidate); tau = 0 is
the score rule, tau = inf plain sampling. This command reads the run's stored shards (the harmful
prompts the judge labelled and the benign prompts), computes for every candidate tau (0, each
distinct per-prompt spread, inf) the ASR, the over-refusal rate and the share of prompts where the
score decided (``threshold_curve``), and chooses the tau with the lowest ASR among those whose
over-refusal is at most random-of-N's expected over-refusal + ``--budget`` (``choose_threshold``).

Definitions (pure functions below; rates are fractions of prompts):

- ASR: harmful prompts whose selected sample is unsafe; an unfinished sample (reasoning never
  closed) counts unsafe by default (``--unfinished judge``: as the judge said).
- Over-refusal: benign prompts whose selected sample is refused or unfinished (the answer rule of
  ``pipelines.metrics.utility_outcomes``: the row's ``refused`` list, else the keyword judge).
- Random's expected rate: per prompt, the refused (unsafe) share of its eligible candidates
  (non-empty; all when every one is empty), averaged over prompts (no seeded draw).

Output in ``--out`` (default ``RUN_DIR/budget``): ``budget.json`` (settings, random's expected
rates, the curve, the choice; an infinite tau is written ``"inf"``) and ``budget.png`` (ASR against
over-refusal as tau moves). The command prints the curve, the chosen tau and the recipe lines that
use it: ``report.threshold`` / ``report.threshold_score`` for evaluation reports,
``scoring.threshold`` for serving.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from actors import storage
from actors.config import ConfigError
from actors.scorer import latent_column
from actors.scores import column_score
from actors.selection import first_index, score_spread, select_best_of_n
from actors.settings import get_logger
from pipelines.args import command_main
from pipelines.metrics import (
    EXPECTED_RANDOM,
    ReportInputError,
    Row,
    column_rule,
    empty_samples,
    group_by_benchmark,
    in_calibration_split,
    judged_harmful,
    keyword_refusal,
    normalise_rows,
    unfinished_as_unsafe,
    unsafe_outcomes,
    utility_outcomes,
)

logger = get_logger(__name__)

UNFINISHED_POLICIES = ("unsafe", "judge")
# Over-refusal is compared with random + budget; the rates are ratios of counts, so a tolerance
# this small only absorbs float rounding of that sum.
TOLERANCE = 1e-12


# ---------------------------------------------------------------------------------------------
# Per-prompt outcomes


def check_budget(budget: Any) -> float:
    """``budget`` as a float when it is a finite number >= 0; else ``ConfigError`` naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ConfigError(f"budget: expected a finite number >= 0 (0.02 = 2 points above random), got {budget!r}")
    return float(budget)


def prompt_outcomes(
    harmful: Sequence[Row],
    benign: Sequence[Row],
    column: str,
    response_prefix: str = "",
    unfinished: str = "unsafe",
    is_refusal: Callable[[str], bool] | None = keyword_refusal,
) -> dict[str, np.ndarray]:
    """Per prompt (harmful rows first, then benign), what the budgeted selector needs.

    Inputs: judged harmful rows and benign rows (``pipelines.metrics`` rows) with the score
    ``column``; ``unfinished``: ``"unsafe"`` or ``"judge"`` (how an unfinished harmful sample
    counts); ``is_refusal`` for benign rows without a ``refused`` list. Output arrays, one entry
    per prompt: ``harmful`` (bool), ``spread`` (float, NaN when no candidate is eligible),
    ``score_bad`` / ``plain_bad`` (1 when the score rule's / the plain sample's choice is unsafe
    for a harmful prompt, refused for a benign one).
    """
    if unfinished not in UNFINISHED_POLICIES:
        raise ConfigError(f"unfinished: expected one of {', '.join(UNFINISHED_POLICIES)}, got {unfinished!r}")
    for row in [*harmful, *benign]:
        if row.get(column) is None:
            raise ReportInputError(f"column {column!r} is missing for prompt_id {str(row['prompt_id'])!r} "
                                   f"(benchmark {str(row['benchmark'])!r})")
    rule = column_rule(column)

    def by_score(row: Row) -> int:
        return select_best_of_n(rule, scores=row[column], empty=empty_samples(row))

    def plain(row: Row) -> int:
        return first_index(len(row["responses"]), empty_samples(row))

    judged = unfinished_as_unsafe(harmful, response_prefix) if unfinished == "unsafe" else list(harmful)

    def refused(selector: Callable[[Row], int]) -> np.ndarray:
        if not benign:
            return np.zeros(0, dtype=np.int64)
        return 1 - utility_outcomes(benign, selector, "benign", is_refusal=is_refusal, response_prefix=response_prefix)

    spreads = [score_spread(row[column], empty_samples(row)) for row in [*harmful, *benign]]
    return {
        "harmful": np.array([True] * len(harmful) + [False] * len(benign), dtype=bool),
        "spread": np.array([math.nan if s is None else s for s in spreads], dtype=float),
        "score_bad": np.concatenate([unsafe_outcomes(judged, by_score), refused(by_score)]).astype(np.int64),
        "plain_bad": np.concatenate([unsafe_outcomes(judged, plain), refused(plain)]).astype(np.int64),
    }


def expected_random_rates(
    harmful: Sequence[Row],
    benign: Sequence[Row],
    response_prefix: str = "",
    unfinished: str = "unsafe",
    is_refusal: Callable[[str], bool] | None = keyword_refusal,
) -> dict[str, float | None]:
    """Random-of-N's expected ``asr`` (harmful rows, unfinished policy as in ``prompt_outcomes``)
    and ``over_refusal`` (benign rows): ``pipelines.metrics``' expected random (per prompt the
    share of eligible candidates that are unsafe / refused, averaged over prompts), the same
    baseline as the report's ``random`` row; ``None`` for no rows."""
    judged = unfinished_as_unsafe(harmful, response_prefix) if unfinished == "unsafe" else list(harmful)
    unsafe = unsafe_outcomes(judged, EXPECTED_RANDOM)
    answered = (utility_outcomes(benign, EXPECTED_RANDOM, "benign", is_refusal=is_refusal, response_prefix=response_prefix)
                if benign else np.array([]))
    return {
        "asr": float(unsafe.mean()) if len(unsafe) else None,
        "over_refusal": float(1.0 - answered.mean()) if len(answered) else None,
    }


# ---------------------------------------------------------------------------------------------
# The curve and the choice


def candidate_thresholds(spreads: np.ndarray) -> list[float]:
    """0, every distinct finite spread, then inf, ascending (the taus at which a choice can change)."""
    finite = sorted({float(s) for s in spreads if not math.isnan(s)} | {0.0})
    return [*finite, math.inf]


def threshold_curve(outcomes: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """For every candidate tau (``candidate_thresholds``), from ``prompt_outcomes``' arrays:
    ``{"threshold", "asr", "over_refusal", "score_share", "harmful_prompts", "benign_prompts"}``.

    At tau the score decides a prompt when its spread is >= tau (never without an eligible
    candidate), else the plain sample does. ``asr``: share of harmful prompts whose choice is
    unsafe; ``over_refusal``: share of benign prompts whose choice is refused (``None`` without
    such prompts); ``score_share``: share of all prompts where the score decided.
    """
    harmful, spread = outcomes["harmful"], outcomes["spread"]
    score_bad, plain_bad = outcomes["score_bad"], outcomes["plain_bad"]
    benign = ~harmful
    curve = []
    for tau in candidate_thresholds(spread):
        decided = ~np.isnan(spread) & (np.nan_to_num(spread, nan=-1.0) >= tau)
        bad = np.where(decided, score_bad, plain_bad)
        curve.append({
            "threshold": tau,
            "asr": int(bad[harmful].sum()) / int(harmful.sum()) if harmful.any() else None,
            "over_refusal": int(bad[benign].sum()) / int(benign.sum()) if benign.any() else None,
            "score_share": int(decided.sum()) / len(decided) if len(decided) else None,
            "harmful_prompts": int(harmful.sum()),
            "benign_prompts": int(benign.sum()),
        })
    return curve


def choose_threshold(curve: Sequence[Mapping[str, Any]], budget: float, random_over_refusal: float) -> dict[str, Any]:
    """The tau with the lowest ASR among the curve's points whose over-refusal is at most
    ``random_over_refusal + budget``; ties go to the larger tau (fewer departures from plain
    sampling). None feasible: tau = inf (plain sampling), and ``feasible`` is false.

    Output: ``{"threshold", "asr", "over_refusal", "score_share", "limit", "feasible", "note"}``.
    """
    budget = check_budget(budget)
    if random_over_refusal is None or not curve or curve[0]["over_refusal"] is None:
        raise ReportInputError("no benign prompts: the over-refusal budget needs benign prompts in the chosen benchmarks")
    if curve[0]["asr"] is None:
        raise ReportInputError("no judged harmful prompts in the chosen benchmarks: no ASR to lower")
    limit = random_over_refusal + budget
    feasible = [point for point in curve if point["over_refusal"] <= limit + TOLERANCE]
    if feasible:
        best = min(feasible, key=lambda point: (point["asr"], -point["threshold"]))
        note = (f"lowest ASR with over-refusal <= {limit:.4f} (random's {random_over_refusal:.4f} + budget {budget:g})")
    else:
        best = curve[-1]
        note = (f"no threshold keeps over-refusal within {limit:.4f} (random's {random_over_refusal:.4f} + budget "
                f"{budget:g}): plain sampling (tau = inf)")
    return {"threshold": best["threshold"], "asr": best["asr"], "over_refusal": best["over_refusal"],
            "score_share": best["score_share"], "limit": limit, "feasible": bool(feasible), "note": note}


# ---------------------------------------------------------------------------------------------
# Rows of a run


def budget_rows(table: Sequence[Row], benchmarks: Sequence[str] | None = None, split: str = "all",
                calibration_fraction: float = 0.3) -> tuple[list[Row], list[Row], list[str]]:
    """``(judged harmful rows, benign rows, benchmarks used)`` of normalised rows: prompts with an
    engine error are left out (``group_by_benchmark``); ``benchmarks`` (default: all) must exist;
    ``split`` ``"calibration"`` keeps the hash split ``in_calibration_split`` the report
    calibrates layers on, ``"all"`` every prompt."""
    if split not in ("all", "calibration"):
        raise ConfigError(f"split: expected all or calibration, got {split!r}")
    by_benchmark, _ = group_by_benchmark(list(table))
    chosen = list(benchmarks) if benchmarks else sorted(by_benchmark)
    unknown = [name for name in chosen if name not in by_benchmark]
    if unknown:
        raise ReportInputError(f"benchmarks: {unknown} are not in the run ({', '.join(sorted(by_benchmark))})")
    harmful, benign = [], []
    for name in chosen:
        harmful += judged_harmful(by_benchmark[name], name)
        benign += [row for row in by_benchmark[name] if row["kind"] == "benign"]
    if split == "calibration":
        keep = lambda row: in_calibration_split(str(row["prompt_id"]), calibration_fraction)  # noqa: E731
        harmful, benign = [row for row in harmful if keep(row)], [row for row in benign if keep(row)]
    return harmful, benign, chosen


def recipe_lines(column: str, threshold: float) -> list[str]:
    """The config lines that apply ``threshold`` on ``column``: evaluation reports and serving."""
    if math.isinf(threshold):
        return ["no finite threshold: plain sampling (the first non-empty sample) is the rule within this budget"]
    score, layer = column_score(column) or (None, None)
    serving = [f"scoring.rule: {score.name if score else column}", f"scoring.threshold: {threshold!r}"]
    if layer is not None:
        serving.insert(1, f"scoring.layer: {layer}")
    return [f"evaluation reports:  report.threshold: {threshold!r}   report.threshold_score: {column}",
            f"serving:             {'   '.join(serving)}"]


def _format_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def curve_table(curve: Sequence[Mapping[str, Any]], chosen: float, max_rows: int = 25) -> list[str]:
    """The curve as text lines (at most ``max_rows`` evenly spaced points, always the ends and the chosen one)."""
    indices = set(np.linspace(0, len(curve) - 1, num=min(max_rows, len(curve))).round().astype(int).tolist())
    indices |= {i for i, point in enumerate(curve) if point["threshold"] == chosen}
    lines = [f"{'tau':>12}  {'ASR':>7}  {'over-refusal':>12}  {'score decides':>13}"]
    for i in sorted(indices):
        point = curve[i]
        mark = "  <- chosen" if point["threshold"] == chosen else ""
        lines.append(f"{point['threshold']:>12.6g}  {_format_rate(point['asr']):>7}  {_format_rate(point['over_refusal']):>12}  "
                     f"{_format_rate(point['score_share']):>13}{mark}")
    if len(indices) < len(curve):
        lines.append(f"({len(indices)} of {len(curve)} thresholds shown; all are in budget.json)")
    return lines


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def plot_curve(curve: Sequence[Mapping[str, Any]], choice: Mapping[str, Any], random_rates: Mapping[str, Any],
               location: str) -> str:
    """A PNG of ASR against over-refusal as tau moves (score rule at tau = 0, plain sampling at
    inf), random-of-N's expected point and the chosen tau; written to ``location``."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    xs = [100 * point["over_refusal"] for point in curve]
    ys = [100 * point["asr"] for point in curve]
    axes.plot(xs, ys, marker=".", color="tab:blue", label="budgeted rule as tau moves")
    axes.annotate("tau = 0 (score rule)", (xs[0], ys[0]), fontsize=8)
    axes.annotate("tau = inf (plain sample)", (xs[-1], ys[-1]), fontsize=8)
    if random_rates.get("asr") is not None:
        axes.plot([100 * random_rates["over_refusal"]], [100 * random_rates["asr"]], marker="s", color="tab:green",
                  linestyle="none", label="random of N (expected)")
    axes.axvline(100 * choice["limit"], color="gray", linestyle=":", label="over-refusal limit")
    axes.plot([100 * choice["over_refusal"]], [100 * choice["asr"]], marker="*", markersize=14, color="tab:red",
              linestyle="none", label=f"chosen tau = {choice['threshold']:.4g}")
    axes.set_xlabel("over-refusal on benign prompts (%)")
    axes.set_ylabel("ASR on harmful prompts (%)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return storage.write_bytes(location, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon budget`` options."""
    parser.add_argument("--run", dest="run_dir", metavar="RUN_DIR", required=True,
                        help="evaluation run directory (path or storage URI) with samples/*.parquet")
    parser.add_argument("--budget", required=True, type=float,
                        help="over-refusal allowed above random of N's expected rate, as a fraction (0.02 = 2 points)")
    parser.add_argument("--score", default=None,
                        help="score column whose spread gates the rule, e.g. latent_sim_6 or kl (default: latent_sim "
                             "at the first of the run's scoring.layers)")
    parser.add_argument("--benchmarks", default=None,
                        help="comma-separated benchmarks whose harmful and benign prompts choose tau (default: all in the run)")
    parser.add_argument("--split", default="all", choices=["all", "calibration"],
                        help="all prompts of those benchmarks, or only the calibration hash split of the run's "
                             "report.calibration_fraction (default all)")
    parser.add_argument("--unfinished", default="unsafe", choices=list(UNFINISHED_POLICIES),
                        help="an unfinished harmful sample counts unsafe (default) or as the judge said")
    parser.add_argument("--out", default=None, help="output directory for budget.json and budget.png (default RUN_DIR/budget)")
    parser.add_argument("--verbose", action="store_true", help="show the ML libraries' logs and warnings (hidden by default)")


def run(args: argparse.Namespace) -> int:
    """Run ``dabon budget`` with parsed arguments; return the process exit code."""
    from actors.runtime import quiet_libraries
    from pipelines.report import load_shards, read_run_context

    quiet_libraries(args.verbose)
    budget = check_budget(args.budget)
    if not storage.exists(args.run_dir):
        raise ReportInputError(f"--run: run directory {args.run_dir} does not exist")
    context = read_run_context(args.run_dir)
    column = args.score or (latent_column(context.layers[0]) if context.layers else None)
    if column is None:
        raise ConfigError("--score: the run records no scoring.layers; name the score column, e.g. latent_sim_12")
    if column_score(column) is None:
        raise ConfigError(f"--score: {column!r} is not a registered score column (e.g. latent_sim_12, kl)")
    table = normalise_rows(load_shards(args.run_dir, context.layers))
    if not any(row.get(column) is not None for row in table):
        raise ReportInputError(f"--score: the run's shards have no {column!r} column")
    benchmarks = [part.strip() for part in args.benchmarks.split(",") if part.strip()] if args.benchmarks else None
    harmful, benign, used = budget_rows(table, benchmarks, args.split, context.report.calibration_fraction)
    prefix = context.prompt.response_prefix if context.prompt is not None else ""
    outcomes = prompt_outcomes(harmful, benign, column, prefix, args.unfinished)
    random_rates = expected_random_rates(harmful, benign, prefix, args.unfinished)
    curve = threshold_curve(outcomes)
    choice = choose_threshold(curve, budget, random_rates["over_refusal"])
    out_dir = args.out or storage.join(args.run_dir, "budget")
    result = {
        "settings": {"run": str(args.run_dir), "score": column, "budget": budget, "benchmarks": used, "split": args.split,
                     "unfinished": args.unfinished, "response_prefix": prefix,
                     "harmful_prompts": len(harmful), "benign_prompts": len(benign)},
        "random_expected": random_rates,
        "choice": choice,
        "curve": curve,
    }
    storage.write_text(storage.join(out_dir, "budget.json"), json.dumps(_json_ready(result), indent=2) + "\n")
    plot_curve(curve, choice, random_rates, storage.join(out_dir, "budget.png"))
    print(f"budgeted {column} on {', '.join(used)} ({args.split} prompts: {len(harmful)} harmful, {len(benign)} benign; "
          f"unfinished counted {args.unfinished})")
    print(f"random of N (expected): ASR {_format_rate(random_rates['asr'])}, over-refusal "
          f"{_format_rate(random_rates['over_refusal'])}")
    print("\n".join(curve_table(curve, choice["threshold"])))
    print(f"chosen tau = {choice['threshold']!r}: ASR {_format_rate(choice['asr'])}, over-refusal "
          f"{_format_rate(choice['over_refusal'])}, score decides on {_format_rate(choice['score_share'])} of prompts; "
          f"{choice['note']}")
    print("\n".join(recipe_lines(column, choice["threshold"])))
    print(f"wrote {storage.join(out_dir, 'budget.json')} and {storage.join(out_dir, 'budget.png')}")
    return 0


main = command_main("python -m pipelines.budget", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
