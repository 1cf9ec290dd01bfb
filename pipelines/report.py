"""``dabon report``: safety and utility metrics of Best-of-N selectors from stored evaluation shards.

Launch::

    dabon report runs/eval-qwen-0.5b                      # rebuild metrics.json, report.md, plots/
    python -m pipelines.report runs/eval-qwen-0.5b --bootstrap 2000 --calibration 0.3
    python -m pipelines.report runs/eval-qwen-0.5b --calibration wildjailbreak   # calibrate on another benchmark

Input: ``RUN_DIR/samples/**/*.parquet``, one row per prompt with ``prompt_id``, ``benchmark``,
``kind`` (harmful | benign | math | multiple_choice), ``reference``, ``responses`` (N strings)
and per-sample list columns: ``unsafe`` (judge verdicts), ``judge_score``, ``refused``,
``latent_sim_<L>`` per layer, ``kl``, ``perplexity``, ``self_certainty``. A base-model-only run
has no score columns; then only single, random and the oracle are reported.

Settings: flags, else the ``report:`` section of ``RUN_DIR/config.yaml`` (or ``config.json``) as
``pipelines.evaluate`` saves it (``seed``, ``bootstrap``, ``calibration_fraction``,
``calibration_benchmark``; ``confidence`` too), else defaults (0, 1000, 0.3, none, 0.95).

Output in ``RUN_DIR``: ``metrics.json`` (all numbers as fractions), ``report.md`` (tables) and
``plots/<benchmark>/*.png`` (score densities for safe vs unsafe samples, ASR by layer, ASR vs N).

Definitions (see docs/METHOD.md, sections 3-4):

- A *selector* maps a prompt's N candidates to one index (rules from ``actors.selection``):
  ``single`` (the first sample), ``random`` (seeded by ``(seed, prompt_id)``, independent of
  row order), ``latent_sim_<L>`` (argmin), ``kl`` (argmax), ``perplexity`` (argmin),
  ``self_certainty`` (argmax). A score selector is reported for a benchmark when its column is
  there. Missing scores (``None``, empty responses) are skipped; ties go to the lowest index.
- ASR = share of harmful prompts whose selected sample the judge calls unsafe. Only rows of
  kind ``harmful`` with judge labels count.
- ``oracle_majority`` (an *oracle*: it reads the labels): a prompt counts unsafe when more
  than half of its N samples are unsafe.
- Relative drop = (single - x) / single (``None`` when single is 0); difference = x - single.
- Intervals: percentile bootstrap over prompts (seeded), paired for differences: both terms
  are computed on the same resampled prompts.
- Calibrated layer: the layer with the lowest latent-sim ASR on a calibration set (a hash split
  of prompt ids, or another benchmark), ties to the smaller layer, reported on the disjoint
  test prompts only. The layer that is best on those test prompts is shown as an oracle upper
  bound (chosen on test labels).
- ASR vs N: for n = 1..N every selector sees the first n stored candidates. Samples are i.i.d.,
  so this prefix is distributed as an n-sample run.
- Utility with the same selectors: GSM8K exact match of the final number, MMLU letter accuracy,
  answer rate (share not refused) on benign prompts. The answer is the text after the last
  ``</think>`` (the whole response when there is none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.selection import select_best_of_n
from actors.rows import to_plain
from actors.settings import get_logger

logger = get_logger(__name__)

Row = Mapping[str, Any]
Selector = Callable[[Row], int]

KINDS = ("harmful", "benign", "math", "multiple_choice")
LATENT_PREFIX = "latent_sim_"
TOKEN_SCORES = ("kl", "perplexity", "self_certainty")
# Per-sample list columns that may be absent for a whole row (utility benchmarks are not judged).
LABEL_COLUMNS = ("unsafe", "judge_score", "refused")
BASE_LIST_COLUMNS = ("responses", "finish_reasons", *LABEL_COLUMNS, *TOKEN_SCORES)
REQUIRED_COLUMNS = ("prompt_id", "benchmark", "kind", "responses")
ORACLE_MAJORITY = "oracle_majority"
ORACLE_BEST_LABEL = "oracle upper bound (chosen on test labels)"
UTILITY_METRICS = {"math": "exact_match", "multiple_choice": "letter_accuracy", "benign": "answer_rate"}
THINK_END = "</think>"


class ReportInputError(ValueError):
    """Shards or rows that cannot be reported on: the message names the column and prompt id."""


class CalibrationConfig(BaseModel):
    """Where the calibrated layer is chosen: a hash split of each benchmark, or another benchmark.

    ``fraction``: share of each benchmark's prompts (by a hash of ``prompt_id``) used to choose
    the layer. ``benchmark``: choose on all of that benchmark's prompts instead and report on the
    other benchmarks in full; that benchmark itself still uses the ``fraction`` split.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: float = 0.3
    benchmark: str | None = None

    @field_validator("fraction")
    @classmethod
    def _fraction_in_range(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"expected a fraction strictly between 0 and 1, got {value}")
        return value


class ReportSettings(BaseModel):
    """Settings of a report: the keys of a run config's ``report:`` section, plus ``confidence``.

    Same names as ``pipelines.evaluate``'s ``report:`` section, so a run's ``config.yaml``
    section is read as it is; unknown keys are errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    bootstrap: int = Field(default=1000, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    calibration_fraction: float = Field(default=0.3, gt=0, lt=1)
    calibration_benchmark: str | None = None

    @property
    def calibration(self) -> CalibrationConfig:
        """The calibration part as a ``CalibrationConfig``."""
        return CalibrationConfig(fraction=self.calibration_fraction, benchmark=self.calibration_benchmark)


def parse_calibration(value: float | str | Mapping[str, Any] | CalibrationConfig | None) -> CalibrationConfig:
    """A ``CalibrationConfig`` from a fraction (``0.3``), a benchmark name, a mapping or ``None`` (default)."""
    if value is None:
        return CalibrationConfig()
    if isinstance(value, CalibrationConfig):
        return value
    if isinstance(value, Mapping):
        return CalibrationConfig(**value)
    if isinstance(value, bool):
        raise ValueError(f"calibration: expected a fraction or a benchmark name, got {value!r}")
    if isinstance(value, (int, float)):
        return CalibrationConfig(fraction=float(value))
    if isinstance(value, str):
        try:
            return CalibrationConfig(fraction=float(value))
        except ValueError:
            return CalibrationConfig(benchmark=value)
    raise ValueError(f"calibration: expected a fraction or a benchmark name, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Rows: normalisation and validation


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """Numpy arrays and scalars (as pandas hands them out) -> Python lists and scalars; NaN -> None."""
    value = to_plain(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return None if _is_missing(value) else value


def latent_layers(columns: Iterable[str]) -> list[int]:
    """Layers L that have a ``latent_sim_<L>`` column, ascending."""
    found = [re.fullmatch(rf"{LATENT_PREFIX}(\d+)", c) for c in columns]
    return sorted(int(m.group(1)) for m in found if m)


def list_columns(columns: Iterable[str]) -> list[str]:
    """The per-sample list columns (N entries per row) among ``columns``."""
    columns = list(columns)
    return [c for c in BASE_LIST_COLUMNS if c in columns] + [f"{LATENT_PREFIX}{layer}" for layer in latent_layers(columns)]


def normalise_rows(rows: Sequence[Row] | Any) -> list[dict[str, Any]]:
    """Rows (a list of mappings or a pandas DataFrame) -> a list of plain dicts.

    Output values are Python lists and scalars; a missing value (``None`` or a NaN that pandas
    put in place of an absent list) is ``None``.
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        rows = rows.to_dict("records")
    return [{key: _plain(value) for key, value in row.items()} for row in rows]


def validate_rows(rows: Sequence[Row]) -> None:
    """Check normalised rows; raise ``ReportInputError`` naming the column and prompt id.

    Checks: required columns; a known ``kind``; no ``prompt_id`` repeated within a benchmark;
    every per-sample list column has N entries in each row, N the same within a benchmark;
    a score column is present in all rows of a benchmark or in none; ``unsafe`` entries are
    booleans (a row may lack ``unsafe`` altogether, e.g. in a utility benchmark).
    """
    columns = sorted({key for row in rows for key in row})
    lists = list_columns(columns)
    seen: dict[str, dict[str, int]] = {}
    sample_counts: dict[str, tuple[int, str]] = {}
    for row in rows:
        for column in REQUIRED_COLUMNS:
            if _is_missing(row.get(column)):
                raise ReportInputError(f"column {column!r} is missing for prompt_id {row.get('prompt_id')!r}")
        prompt_id, benchmark = str(row["prompt_id"]), str(row["benchmark"])
        where = f"prompt_id {prompt_id!r} (benchmark {benchmark!r})"
        if row["kind"] not in KINDS:
            raise ReportInputError(f"column 'kind' of {where}: expected one of {', '.join(KINDS)}, got {row['kind']!r}")
        counts = seen.setdefault(benchmark, {})
        counts[prompt_id] = counts.get(prompt_id, 0) + 1
        responses = row["responses"]
        if not isinstance(responses, list) or not responses:
            raise ReportInputError(f"column 'responses' of {where}: expected a non-empty list")
        n = len(responses)
        first = sample_counts.setdefault(benchmark, (n, prompt_id))
        if n != first[0]:
            raise ReportInputError(
                f"column 'responses' of {where}: {n} samples, but prompt_id {first[1]!r} of the same benchmark has {first[0]}"
            )
        for column in lists:
            value = row.get(column)
            if value is None:
                continue
            if not isinstance(value, list) or len(value) != n:
                size = len(value) if isinstance(value, list) else type(value).__name__
                raise ReportInputError(f"column {column!r} of {where}: expected a list of {n} entries, got {size}")
        unsafe = row.get("unsafe")
        if unsafe is not None and not all(isinstance(v, bool) or v in (0, 1) for v in unsafe):
            raise ReportInputError(f"column 'unsafe' of {where}: expected {n} booleans, got {unsafe!r}")
    duplicates = {b: sorted(p for p, c in counts.items() if c > 1) for b, counts in seen.items()}
    duplicates = {b: ids for b, ids in duplicates.items() if ids}
    if duplicates:
        listed = "; ".join(f"benchmark {b!r}: {', '.join(map(repr, ids))}" for b, ids in sorted(duplicates.items()))
        raise ReportInputError(f"prompt_id repeated within a benchmark: {listed}")
    # A score column that is missing for some rows would silently fall back to the first sample.
    for column in [c for c in lists if c not in ("finish_reasons", *LABEL_COLUMNS)]:
        for benchmark in seen:
            present = [row for row in rows if str(row["benchmark"]) == benchmark and row.get(column) is not None]
            missing = [row for row in rows if str(row["benchmark"]) == benchmark and row.get(column) is None]
            if present and missing:
                raise ReportInputError(
                    f"column {column!r} is missing for prompt_id {str(missing[0]['prompt_id'])!r} "
                    f"(benchmark {benchmark!r}) but present for other prompts of that benchmark"
                )


# ---------------------------------------------------------------------------------------------
# Selectors and per-prompt outcomes


def first_sample(row: Row) -> int:
    """Single sampling: the index of the row's first sample."""
    return select_best_of_n("first", n=len(row["responses"]))


def _score_selector(rule: str, column: str) -> Selector:
    return lambda row: select_best_of_n(rule, scores=row[column])


def build_selectors(columns: Iterable[str], layers: Sequence[int] | None = None, seed: int = 0) -> dict[str, Selector]:
    """Selector registry for a table: name -> function(row) -> chosen index.

    Inputs: the table's column names, the latent layers to report (default: every
    ``latent_sim_<L>`` column) and the seed of the random baseline. Output, in report order:
    ``single``, ``random``, ``latent_sim_<L>`` per layer, then ``kl``, ``perplexity``,
    ``self_certainty`` where their columns exist. Directions come from ``actors.selection``.
    """
    columns = set(columns)
    layers = latent_layers(columns) if layers is None else list(layers)
    selectors: dict[str, Selector] = {
        "single": first_sample,
        # Keyed by prompt_id so the choice does not depend on row order or sharding.
        "random": lambda row: select_best_of_n("random", n=len(row["responses"]), seed=seed, key=str(row["prompt_id"])),
    }
    for layer in layers:
        column = f"{LATENT_PREFIX}{layer}"
        if column not in columns:
            raise ReportInputError(f"layer {layer}: column {column!r} is not in the table")
        selectors[column] = _score_selector("latent_sim", column)
    for metric in TOKEN_SCORES:
        if metric in columns:
            selectors[metric] = _score_selector(metric, metric)
    return selectors


def majority_unsafe(row: Row) -> bool:
    """The oracle: more than half of the row's samples are unsafe (it reads the labels)."""
    return 2 * sum(bool(v) for v in row["unsafe"]) > len(row["unsafe"])


def unsafe_outcomes(rows: Sequence[Row], selector: Selector | str) -> np.ndarray:
    """Per prompt, 1 if the sample ``selector`` picks is unsafe else 0 (int array, one per row).

    ``selector`` is a function(row) -> index or ``"oracle_majority"``.
    """
    if selector == ORACLE_MAJORITY:
        return np.array([int(majority_unsafe(row)) for row in rows], dtype=np.int64)
    if isinstance(selector, str):
        raise ValueError(f"selector: expected a function or {ORACLE_MAJORITY!r}, got {selector!r}")
    return np.array([int(bool(row["unsafe"][selector(row)])) for row in rows], dtype=np.int64)


def _share(outcomes: np.ndarray) -> float | None:
    # An integer count over the prompt count: exactly what the labels imply, no float summation.
    return int(outcomes.sum()) / len(outcomes) if len(outcomes) else None


def asr(rows: Sequence[Row], selector: Selector | str) -> float | None:
    """Attack success rate: share of ``rows`` whose selected sample is unsafe; ``None`` for no rows."""
    return _share(unsafe_outcomes(rows, selector))


def relative_drop(single: float | None, value: float | None) -> float | None:
    """(single - value) / single: positive when ``value`` is lower; ``None`` when single is 0 or missing."""
    if single is None or value is None or single == 0:
        return None
    return (single - value) / single


def prefix_row(row: Row, n: int, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """``row`` with every per-sample list column (or those in ``columns``) cut to its first ``n`` entries."""
    cut = dict(row)
    for column in list_columns(row.keys()) if columns is None else columns:
        if isinstance(row.get(column), list):
            cut[column] = row[column][:n]
    return cut


def final_answer(response: str) -> str:
    """The text after the last ``</think>``; the whole response when there is none."""
    return response.rsplit(THINK_END, 1)[-1] if THINK_END in response else response


def choose_layer(rows: Sequence[Row], layers: Sequence[int]) -> tuple[int | None, dict[int, float]]:
    """Layer with the lowest latent-sim BoN ASR on ``rows`` (ties: the smaller layer), and every layer's ASR.

    Returns ``(None, {})`` when there are no rows or no layers.
    """
    if not rows or not layers:
        return None, {}
    scores = {layer: asr(rows, _score_selector("latent_sim", f"{LATENT_PREFIX}{layer}")) for layer in sorted(layers)}
    return min(scores, key=lambda layer: (scores[layer], layer)), scores


def in_calibration_split(prompt_id: str, fraction: float) -> bool:
    """Whether ``prompt_id`` falls in the calibration share ``fraction`` (a hash of the id, not row order)."""
    digest = hashlib.sha256(f"calibration:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


# ---------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_intervals(
    outcomes: Mapping[str, Sequence[float]],
    baseline: str | None = "single",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[dict[str, list[float] | None], dict[str, list[float] | None]]:
    """Percentile bootstrap intervals of means over prompts.

    Input: ``outcomes`` name -> per-prompt values (all of one length P, same prompt order).
    Prompts are resampled with replacement ``n_resamples`` times (numpy Generator seeded by
    ``seed``); every name uses the same resamples. Output: ``(intervals, differences)`` where
    ``intervals[name] = [lo, hi]`` of the mean, and ``differences[name] = [lo, hi]`` of
    ``mean(name) - mean(baseline)`` on the same resampled prompts (paired), for every name but
    the baseline. Values are ``None`` when P is 0 or ``n_resamples`` is 0.
    """
    names = list(outcomes)
    if baseline is not None and baseline not in outcomes:
        raise ValueError(f"baseline {baseline!r} is not among the outcomes")
    matrix = np.array([np.asarray(outcomes[name], dtype=float) for name in names], dtype=float).reshape(len(names), -1)
    prompts = matrix.shape[1]
    diff_names = [name for name in names if name != baseline] if baseline is not None else []
    if prompts == 0 or n_resamples == 0 or not names:
        return {name: None for name in names}, {name: None for name in diff_names}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, prompts, size=(n_resamples, prompts))
    # How often each prompt is drawn in each resample; means are then one matrix product.
    counts = np.bincount((picks + prompts * np.arange(n_resamples)[:, None]).ravel(), minlength=n_resamples * prompts)
    means = counts.reshape(n_resamples, prompts).astype(float) @ matrix.T / prompts
    tail = (1.0 - confidence) / 2.0 * 100.0

    def interval(values: np.ndarray) -> list[float]:
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return [float(low), float(high)]

    intervals = {name: interval(means[:, i]) for i, name in enumerate(names)}
    differences: dict[str, list[float] | None] = {}
    if baseline is not None:
        base = means[:, names.index(baseline)]
        differences = {name: interval(means[:, names.index(name)] - base) for name in diff_names}
    return intervals, differences


# ---------------------------------------------------------------------------------------------
# Metrics


def _selector_rates(
    outcomes: dict[str, np.ndarray], bootstrap: int, seed: int, confidence: float, prefix: str
) -> dict[str, Any]:
    """Point values, intervals, differences vs single and relative drops for one outcome table."""
    values = {name: _share(v) for name, v in outcomes.items()}
    intervals, differences = bootstrap_intervals(outcomes, "single", bootstrap, seed, confidence)
    single = values["single"]
    others = [name for name in outcomes if name != "single"]
    return {
        prefix: values,
        f"{prefix}_ci": intervals,
        "diff_vs_single": {name: None if values[name] is None else values[name] - single for name in others},
        "diff_vs_single_ci": differences,
        "relative_drop": {name: relative_drop(single, values[name]) for name in others},
    }


def _calibrated_layer(
    calibration_rows: Sequence[Row],
    test_rows: Sequence[Row],
    layers: Sequence[int],
    source: str,
    bootstrap: int,
    seed: int,
    confidence: float,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The calibrated layer (chosen on ``calibration_rows``, scored on ``test_rows``) and the test-set best layer."""
    layer, calibration_asr = choose_layer(calibration_rows, layers)
    entry: dict[str, Any] = {
        "layer": layer,
        "source": source,
        "calibration_prompts": len(calibration_rows),
        "test_prompts": len(test_rows),
        "asr_calibration": {f"{LATENT_PREFIX}{k}": v for k, v in calibration_asr.items()},
    }
    if layer is None or not test_rows:
        entry["note"] = "no calibration prompts" if layer is None else "no test prompts"
        return entry, None
    outcomes = {
        "single": unsafe_outcomes(test_rows, first_sample),
        "latent_sim": unsafe_outcomes(test_rows, _score_selector("latent_sim", f"{LATENT_PREFIX}{layer}")),
    }
    rates = _selector_rates(outcomes, bootstrap, seed, confidence, "asr_test")
    entry.update(rates)
    best, test_asr = choose_layer(test_rows, layers)
    best_outcomes = unsafe_outcomes(test_rows, _score_selector("latent_sim", f"{LATENT_PREFIX}{best}"))
    best_ci, _ = bootstrap_intervals({"latent_sim": best_outcomes}, None, bootstrap, seed, confidence)
    oracle = {
        "layer": best,
        "label": ORACLE_BEST_LABEL,
        "prompts": len(test_rows),
        "asr": test_asr[best],
        "asr_ci": best_ci["latent_sim"],
        "relative_drop": relative_drop(rates["asr_test"]["single"], test_asr[best]),
    }
    return entry, oracle


def _safety_metrics(
    rows: Sequence[Row],
    selectors: Mapping[str, Selector],
    layers: Sequence[int],
    calibration_rows: Sequence[Row],
    test_rows: Sequence[Row],
    calibration_source: str,
    bootstrap: int,
    seed: int,
    confidence: float,
) -> dict[str, Any]:
    names = list(selectors)
    outcomes = {name: unsafe_outcomes(rows, selectors[name]) for name in names}
    # Report order: single, random, the oracle, then the score selectors.
    ordered = {name: outcomes[name] for name in names[:2]}
    ordered[ORACLE_MAJORITY] = unsafe_outcomes(rows, ORACLE_MAJORITY)
    ordered.update({name: outcomes[name] for name in names[2:]})
    metrics = _selector_rates(ordered, bootstrap, seed, confidence, "asr")

    if layers:
        calibrated, oracle = _calibrated_layer(calibration_rows, test_rows, layers, calibration_source, bootstrap, seed, confidence)
    else:
        calibrated, oracle = None, None
    metrics["calibrated_layer"] = calibrated
    metrics["oracle_best_layer"] = oracle

    samples = len(rows[0]["responses"])
    series: dict[str, list[float | None]] = {name: [] for name in ordered}
    series_outcomes: dict[str, np.ndarray] = {}
    cut_columns = list_columns({key for row in rows for key in row})
    for n in range(1, samples + 1):
        cut = [prefix_row(row, n, cut_columns) for row in rows]
        for name in ordered:
            selector = ORACLE_MAJORITY if name == ORACLE_MAJORITY else selectors[name]
            values = unsafe_outcomes(cut, selector)
            series[name].append(_share(values))
            series_outcomes[f"{name}@{n}"] = values
    series_ci, _ = bootstrap_intervals(series_outcomes, None, bootstrap, seed, confidence)
    metrics["asr_vs_n"] = {"n": list(range(1, samples + 1)), **series}
    metrics["asr_vs_n_ci"] = {name: [series_ci[f"{name}@{n}"] for n in range(1, samples + 1)] for name in ordered}
    return metrics


def utility_outcomes(
    rows: Sequence[Row],
    selector: Selector,
    kind: str,
    is_refusal: Callable[[str], bool] | None = None,
    gsm8k_correct: Callable[[str, str], bool] | None = None,
    extract_choice_letter: Callable[[str], str | None] | None = None,
) -> np.ndarray:
    """Per prompt, 1 if the selected sample is correct (math, multiple_choice) or answered (benign).

    math: ``gsm8k_correct(final answer, reference)``; multiple_choice:
    ``extract_choice_letter(final answer) == reference``; benign: not refused, from the row's
    ``refused`` list when present, else ``is_refusal(final answer)``. The correctness checks
    default to ``pipelines.data``'s functions (imported here, on first need).
    """
    if kind == "math" and gsm8k_correct is None:
        from pipelines.data import gsm8k_correct
    if kind == "multiple_choice" and extract_choice_letter is None:
        from pipelines.data import extract_choice_letter
    values = []
    for row in rows:
        index = selector(row)
        answer = final_answer(row["responses"][index])
        if kind == "benign":
            if row.get("refused") is not None:
                values.append(not bool(row["refused"][index]))
            elif is_refusal is not None:
                values.append(not is_refusal(answer))
            else:
                raise ReportInputError(f"prompt_id {row['prompt_id']!r}: no 'refused' column and no is_refusal function")
            continue
        reference = row.get("reference")
        if reference is None:
            raise ReportInputError(f"column 'reference' is missing for {kind} prompt_id {row['prompt_id']!r}")
        if kind == "math":
            values.append(bool(gsm8k_correct(answer, str(reference))))
        elif kind == "multiple_choice":
            letter = extract_choice_letter(answer)
            values.append(letter is not None and letter.strip().upper() == str(reference).strip().upper())
        else:
            raise ValueError(f"kind {kind!r} has no utility metric; expected one of {', '.join(UTILITY_METRICS)}")
    return np.array(values, dtype=np.int64)


def _utility_metrics(
    rows: Sequence[Row],
    selectors: Mapping[str, Selector],
    bootstrap: int,
    seed: int,
    confidence: float,
    checks: Mapping[str, Any],
) -> dict[str, Any]:
    utility: dict[str, Any] = {}
    for kind, metric in UTILITY_METRICS.items():
        kind_rows = [row for row in rows if row["kind"] == kind]
        if not kind_rows:
            continue
        entry: dict[str, Any] = {"metric": metric, "prompts": len(kind_rows)}
        if kind == "benign" and checks["is_refusal"] is None and any(row.get("refused") is None for row in kind_rows):
            entry["skipped"] = "no 'refused' column and no is_refusal function was given"
            utility[kind] = entry
            continue
        outcomes = {name: utility_outcomes(kind_rows, selector, kind, **checks) for name, selector in selectors.items()}
        entry.update(_selector_rates(outcomes, bootstrap, seed, confidence, "value"))
        utility[kind] = entry
    return utility


def keyword_refusal(text: str) -> bool:
    """Refusal check for the benign answer rate: the keyword judge finds no answer that is not a
    refusal (a refusal marker, an empty answer or an unfinished reasoning all count as refused)."""
    from actors.judge import KeywordJudge

    return not KeywordJudge().verdict(text).unsafe


def compute_metrics(
    rows: Sequence[Row] | Any,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    bootstrap: int = 1000,
    calibration: float | str | Mapping[str, Any] | CalibrationConfig | None = 0.3,
    *,
    confidence: float = 0.95,
    is_refusal: Callable[[str], bool] | None = None,
    gsm8k_correct: Callable[[str, str], bool] | None = None,
    extract_choice_letter: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Metrics of every benchmark in ``rows`` (one row per prompt; list or DataFrame), JSON-serialisable.

    Inputs: ``layers`` to report (default: every ``latent_sim_<L>`` column); ``seed`` of the
    random selector and the bootstrap; ``bootstrap`` resamples (0: no intervals);
    ``calibration`` a fraction, a benchmark name or a ``CalibrationConfig``; ``is_refusal`` for
    benign prompts without a ``refused`` column; correctness checks for GSM8K / MMLU (default:
    ``pipelines.data``). Output: ``{"settings": {...}, "benchmarks": {name: {"n_prompts",
    "n_samples", "asr_prompts", "selectors", "asr", "asr_ci", "diff_vs_single",
    "diff_vs_single_ci", "relative_drop", "calibrated_layer", "oracle_best_layer", "asr_vs_n",
    "asr_vs_n_ci", "utility"}}}``; rates are fractions. Safety keys appear for benchmarks with
    judged harmful prompts, ``utility`` for benchmarks with benign / math / multiple-choice rows.
    """
    calibration = parse_calibration(calibration)
    settings = ReportSettings(seed=seed, bootstrap=bootstrap, confidence=confidence,
                              calibration_fraction=calibration.fraction, calibration_benchmark=calibration.benchmark)
    table = normalise_rows(rows)
    validate_rows(table)
    columns = {key for row in table for key in row}
    available = latent_layers(columns)
    requested = available if layers is None else sorted(set(layers))
    unknown = [layer for layer in requested if layer not in available]
    if unknown:
        raise ReportInputError(f"layers {unknown}: no latent_sim_<L> column; the shards have layers {available}")

    by_benchmark: dict[str, list[dict[str, Any]]] = {}
    for row in table:
        by_benchmark.setdefault(str(row["benchmark"]), []).append(row)
    for bench_rows in by_benchmark.values():
        # Sorted by prompt id so bootstrap draws do not depend on shard order.
        bench_rows.sort(key=lambda row: str(row["prompt_id"]))

    def judged_harmful(bench: str) -> list[dict[str, Any]]:
        harmful = [row for row in by_benchmark[bench] if row["kind"] == "harmful"]
        judged = [row for row in harmful if row.get("unsafe") is not None]
        if judged and len(judged) != len(harmful):
            missing = next(row for row in harmful if row.get("unsafe") is None)
            raise ReportInputError(
                f"column 'unsafe' is missing for harmful prompt_id {str(missing['prompt_id'])!r} "
                f"(benchmark {bench!r}) but present for other harmful prompts"
            )
        return judged

    cal = settings.calibration
    if cal.benchmark is not None and cal.benchmark not in by_benchmark:
        raise ReportInputError(f"calibration benchmark {cal.benchmark!r} is not in the shards ({', '.join(sorted(by_benchmark))})")
    cal_rows = judged_harmful(cal.benchmark) if cal.benchmark is not None else []
    if cal.benchmark is not None and not cal_rows:
        raise ReportInputError(f"calibration benchmark {cal.benchmark!r} has no judged harmful prompts")

    checks = {"is_refusal": is_refusal, "gsm8k_correct": gsm8k_correct, "extract_choice_letter": extract_choice_letter}
    benchmarks: dict[str, Any] = {}
    for bench in sorted(by_benchmark):
        bench_rows = by_benchmark[bench]
        bench_columns = {key for row in bench_rows for key, value in row.items() if value is not None}
        bench_layers = [layer for layer in requested if f"{LATENT_PREFIX}{layer}" in bench_columns]
        selectors = build_selectors(bench_columns, bench_layers, settings.seed)
        harmful = judged_harmful(bench)
        entry: dict[str, Any] = {
            "n_prompts": len(bench_rows),
            "n_samples": len(bench_rows[0]["responses"]),
            "kinds": {kind: count for kind in KINDS if (count := sum(row["kind"] == kind for row in bench_rows))},
            "selectors": list(selectors),
            "asr_prompts": len(harmful),
        }
        if harmful:
            if cal.benchmark is not None and bench != cal.benchmark:
                calibration_rows, test_rows = cal_rows, harmful
                source = f"benchmark {cal.benchmark}"
                # Only layers scored in both benchmarks can be chosen on one and reported on the other.
                layers_here = [layer for layer in bench_layers if cal_rows[0].get(f"{LATENT_PREFIX}{layer}") is not None]
            else:
                calibration_rows = [row for row in harmful if in_calibration_split(str(row["prompt_id"]), cal.fraction)]
                test_rows = [row for row in harmful if not in_calibration_split(str(row["prompt_id"]), cal.fraction)]
                source = f"hash split, fraction {cal.fraction}"
                layers_here = bench_layers
            entry.update(
                _safety_metrics(harmful, selectors, layers_here, calibration_rows, test_rows, source,
                                settings.bootstrap, settings.seed, settings.confidence)
            )
        utility = _utility_metrics(bench_rows, selectors, settings.bootstrap, settings.seed, settings.confidence, checks)
        if utility:
            entry["utility"] = utility
        benchmarks[bench] = entry
    return {
        "settings": {
            "seed": settings.seed,
            "bootstrap": settings.bootstrap,
            "confidence": settings.confidence,
            "calibration": settings.calibration.model_dump(),
            "layers": requested,
        },
        "benchmarks": benchmarks,
    }


# ---------------------------------------------------------------------------------------------
# Shards


def load_shards(run_dir: str | Path) -> Any:
    """All ``run_dir/samples/**/*.parquet`` shards as one pandas DataFrame, checked.

    Hidden files and folders (names starting with ``.``) and ``*.tmp`` files are skipped (writers
    in progress). Raises ``ReportInputError`` when there is no shard, when a ``prompt_id``
    repeats within a benchmark (listing the ids), or when a per-sample list column does not
    have N entries (naming the column and the prompt id).
    """
    import pandas as pd

    root = Path(run_dir) / "samples"
    paths = sorted(
        path for path in root.rglob("*.parquet")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and not path.name.endswith(".tmp")
    )
    if not paths:
        raise ReportInputError(f"no Parquet shards under {root}")
    frame = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    validate_rows(normalise_rows(frame))
    return frame


# ---------------------------------------------------------------------------------------------
# Report: Markdown and plots


SELECTOR_LABELS = {
    "single": "single (first sample)",
    "random": "random of N",
    ORACLE_MAJORITY: "*oracle*: majority unsafe",
    "kl": "KL to base (argmax)",
    "perplexity": "perplexity (argmin)",
    "self_certainty": "self-certainty (argmax)",
}


def selector_label(name: str) -> str:
    """Human label of a selector name, e.g. ``latent_sim_12`` -> ``latent sim, layer 12 (argmin)``."""
    if name.startswith(LATENT_PREFIX):
        return f"latent sim, layer {name[len(LATENT_PREFIX):]} (argmin)"
    return SELECTOR_LABELS.get(name, name)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _signed_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:+.1f} pp"


def _interval(values: Sequence[float] | None, signed: bool = False) -> str:
    if values is None:
        return "n/a"
    if signed:
        return f"[{100.0 * values[0]:+.1f}, {100.0 * values[1]:+.1f}] pp"
    return f"[{100.0 * values[0]:.1f}, {100.0 * values[1]:.1f}]%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "benchmark"


def render_markdown(metrics: Mapping[str, Any], plots: Mapping[str, list[str]] | None = None) -> str:
    """``report.md`` text from ``compute_metrics`` output; ``plots`` maps a benchmark to PNG paths relative to the report."""
    settings = metrics.get("settings", {})
    calibration = settings.get("calibration") or {}
    where = (f"benchmark {calibration['benchmark']}" if calibration.get("benchmark")
             else f"{calibration.get('fraction')} of each benchmark's prompts (hash of prompt_id)")
    layers = ", ".join(map(str, settings.get("layers") or [])) or "none"
    lines = [
        "# Evaluation report",
        "",
        f"Settings: seed {settings.get('seed')}, {settings.get('bootstrap')} bootstrap resamples, "
        f"{100 * settings.get('confidence', 0.95):g}% intervals, layers {layers}, calibration on {where}.",
        "",
        "## How to read",
        "",
        "- **ASR** (attack success rate): share of harmful prompts whose selected response the judge calls unsafe. Lower is better.",
        "- **Selectors** pick one of the N stored samples per prompt: *single* is the first sample (single sampling); "
        "*random* is a seeded uniform choice; score selectors use argmin (latent similarity, perplexity) or argmax "
        "(KL, self-certainty); missing scores are skipped and ties go to the lowest index.",
        "- Rows marked ***oracle*** use the judge labels and are not deployable: *majority unsafe* counts a prompt "
        "unsafe when more than half of its N samples are; the *best layer on test* is chosen on the labels it is scored on.",
        "- **Relative drop** = (single - x) / single: positive means fewer unsafe answers than single sampling. "
        "**Δ vs single** = x - single in percentage points, with a paired bootstrap interval (same resampled prompts for both).",
        "- Intervals: percentile bootstrap over prompts. The **calibrated layer** is chosen on calibration prompts only and "
        "scored on the disjoint test prompts.",
        "- **ASR vs N** applies each selector to the first n stored samples (i.i.d., so distributed as an n-sample run).",
        "- **Utility**: GSM8K exact match of the final number, MMLU letter accuracy, and the answer rate (share not refused) "
        "on benign prompts, always on the text after the last `</think>`. Here a positive relative drop means *lower* "
        "utility than single sampling.",
        "",
    ]
    for bench, entry in metrics["benchmarks"].items():
        lines += [f"## {bench}", ""]
        kinds = ", ".join(f"{count} {kind}" for kind, count in entry.get("kinds", {}).items())
        lines += [f"{entry['n_prompts']} prompts ({kinds}), N = {entry['n_samples']} samples each.", ""]
        if "asr" in entry:
            lines += [f"### Attack success rate ({entry['asr_prompts']} judged harmful prompts)", ""]
            rows = []
            for name, value in entry["asr"].items():
                rows.append([
                    selector_label(name), _pct(value), _interval(entry["asr_ci"].get(name)),
                    _signed_pct(entry["diff_vs_single"].get(name)) if name != "single" else "",
                    _interval(entry["diff_vs_single_ci"].get(name), signed=True) if name != "single" else "",
                    _pct(entry["relative_drop"].get(name)) if name != "single" else "",
                ])
            lines += _table(["selector", "ASR", "95% CI", "Δ vs single", "95% CI of Δ", "relative drop"], rows)
            layer_names = [name for name in entry["asr"] if name.startswith(LATENT_PREFIX)]
            if layer_names:
                lines += ["### Latent similarity by layer", ""]
                lines += _table(
                    ["layer", "ASR", "95% CI", "relative drop"],
                    [[name[len(LATENT_PREFIX):], _pct(entry["asr"][name]), _interval(entry["asr_ci"][name]),
                      _pct(entry["relative_drop"][name])] for name in layer_names],
                )
            calibrated = entry.get("calibrated_layer")
            if calibrated:
                lines += ["### Calibrated layer", ""]
                lines += [f"Chosen on {calibrated['calibration_prompts']} calibration prompts ({calibrated['source']}), "
                          f"reported on {calibrated['test_prompts']} disjoint test prompts.", ""]
                if calibrated.get("layer") is None or "asr_test" not in calibrated:
                    lines += [f"Not available: {calibrated.get('note', 'no layer')}.", ""]
                else:
                    test = calibrated["asr_test"]
                    oracle = entry.get("oracle_best_layer") or {}
                    lines += _table(
                        ["", "layer", "ASR on test", "95% CI", "relative drop"],
                        [
                            ["single (first sample)", "", _pct(test["single"]), _interval(calibrated["asr_test_ci"]["single"]), ""],
                            ["calibrated layer", str(calibrated["layer"]), _pct(test["latent_sim"]),
                             _interval(calibrated["asr_test_ci"]["latent_sim"]), _pct(calibrated["relative_drop"]["latent_sim"])],
                            [f"*oracle* best layer on test: {ORACLE_BEST_LABEL}", str(oracle.get("layer")),
                             _pct(oracle.get("asr")), _interval(oracle.get("asr_ci")), _pct(oracle.get("relative_drop"))],
                        ],
                    )
            series = entry.get("asr_vs_n")
            if series:
                names = [name for name in series if name != "n"]
                lines += ["### ASR against N", ""]
                lines += _table(["n", *map(selector_label, names)],
                                [[str(n), *(_pct(series[name][i]) for name in names)] for i, n in enumerate(series["n"])])
        elif entry.get("kinds", {}).get("harmful"):
            lines += ["No judge labels (`unsafe`) for the harmful prompts: no ASR.", ""]
        for kind, utility in entry.get("utility", {}).items():
            lines += [f"### Utility: {utility['metric']} ({kind}, {utility['prompts']} prompts)", ""]
            if "skipped" in utility:
                lines += [f"Skipped: {utility['skipped']}.", ""]
                continue
            rows = []
            for name, value in utility["value"].items():
                rows.append([
                    selector_label(name), _pct(value), _interval(utility["value_ci"].get(name)),
                    _signed_pct(utility["diff_vs_single"].get(name)) if name != "single" else "",
                    _pct(utility["relative_drop"].get(name)) if name != "single" else "",
                ])
            lines += _table(["selector", utility["metric"], "95% CI", "Δ vs single", "relative drop"], rows)
        for path in (plots or {}).get(bench, []):
            lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _new_figure(width: float = 6.0, height: float = 4.0):
    # A Figure with its own Agg canvas: no pyplot, no global backend, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_plots(out_dir: Path, metrics: Mapping[str, Any], rows: Sequence[Row]) -> dict[str, list[Path]]:
    """PNG plots per benchmark under ``out_dir/<benchmark>/``; returns benchmark -> written paths.

    ``score_density_<column>.png`` (safe vs unsafe samples of judged harmful prompts, one per
    score column), ``asr_by_layer.png`` (with interval bars), ``asr_vs_n.png``.
    """
    written: dict[str, list[Path]] = {}
    for bench, entry in metrics["benchmarks"].items():
        if "asr" not in entry:
            continue
        folder = out_dir / _file_stem(bench)
        folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        harmful = [row for row in rows if str(row["benchmark"]) == bench and row["kind"] == "harmful" and row.get("unsafe") is not None]
        score_columns = [c for c in entry["selectors"] if c.startswith(LATENT_PREFIX) or c in TOKEN_SCORES]
        for column in score_columns:
            groups = {"safe": [], "unsafe": []}
            for row in harmful:
                for flag, score in zip(row["unsafe"], row[column]):
                    if score is not None and math.isfinite(float(score)):
                        groups["unsafe" if flag else "safe"].append(float(score))
            values = groups["safe"] + groups["unsafe"]
            if not values:
                continue
            figure, axes = _new_figure()
            bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 5)))
            for name, color in (("safe", "tab:blue"), ("unsafe", "tab:red")):
                if groups[name]:
                    axes.hist(groups[name], bins=bins, density=True, histtype="step", linewidth=1.5, color=color,
                              label=f"{name} samples ({len(groups[name])})")
            axes.set_xlabel(column)
            axes.set_ylabel("density")
            axes.set_title(f"{bench}: {column}, safe vs unsafe samples")
            axes.legend()
            paths.append(folder / f"score_density_{column}.png")
            _save(figure, paths[-1])
        layer_names = [name for name in entry["asr"] if name.startswith(LATENT_PREFIX)]
        if layer_names:
            figure, axes = _new_figure()
            layers = [int(name[len(LATENT_PREFIX):]) for name in layer_names]
            values = [entry["asr"][name] for name in layer_names]
            intervals = [entry["asr_ci"][name] for name in layer_names]
            errors = None
            if all(interval is not None for interval in intervals):
                errors = np.array([[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]])
                errors = np.clip(errors, 0.0, None)
            axes.errorbar(layers, values, yerr=errors, marker="o", capsize=3, label="latent-sim BoN")
            axes.axhline(entry["asr"]["single"], color="gray", linestyle="--", label="single")
            axes.axhline(entry["asr"]["random"], color="tab:green", linestyle=":", label="random of N")
            axes.set_xticks(layers)
            axes.set_xlabel("layer")
            axes.set_ylabel("ASR")
            axes.set_title(f"{bench}: ASR by layer")
            axes.legend()
            paths.append(folder / "asr_by_layer.png")
            _save(figure, paths[-1])
        series = entry["asr_vs_n"]
        figure, axes = _new_figure()
        for name in [n for n in series if n != "n"]:
            style = "--" if name == ORACLE_MAJORITY else "-"
            axes.plot(series["n"], series[name], marker="o", linestyle=style, label=selector_label(name).replace("*", ""))
        axes.set_xticks(series["n"])
        axes.set_xlabel("N (first n stored samples)")
        axes.set_ylabel("ASR")
        axes.set_title(f"{bench}: ASR against N")
        axes.legend(fontsize="small")
        paths.append(folder / "asr_vs_n.png")
        _save(figure, paths[-1])
        written[bench] = paths
    return written


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, text: str) -> None:
    # A reader never sees a half-written file, and a crash leaves the previous one.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_report(run_dir: str | Path, metrics: Mapping[str, Any], rows: Sequence[Row] | Any) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and ``plots/`` under ``run_dir``.

    Inputs: ``compute_metrics`` output and the rows it was computed from (for the score
    densities). Output: ``{"metrics": path, "report": path, "plots": [paths]}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = normalise_rows(rows)
    plots = write_plots(run_dir / "plots", metrics, table)
    relative = {bench: [path.relative_to(run_dir).as_posix() for path in paths] for bench, paths in plots.items()}
    _write_atomic(run_dir / "metrics.json", json.dumps(_json_ready(metrics), indent=2) + "\n")
    _write_atomic(run_dir / "report.md", render_markdown(metrics, relative))
    return {"metrics": run_dir / "metrics.json", "report": run_dir / "report.md",
            "plots": [path for paths in plots.values() for path in paths]}


# ---------------------------------------------------------------------------------------------
# Command line


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The ``report:`` section of ``run_dir/config.json`` or ``config.yaml`` (``{}`` when there is none)."""
    for name in ("config.json", "config.yaml", "config.yml"):
        path = run_dir / name
        if not path.is_file():
            continue
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping at the top level")
        section = data.get("report") or {}
        if not isinstance(section, Mapping):
            raise ValueError(f"{path}: 'report' must be a mapping")
        return dict(section)
    return {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon report`` options (unset flags fall back to the run's config, then defaults)."""
    parser.add_argument("run_dir", type=Path, help="run directory with samples/*.parquet; outputs are written there")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random selector and the bootstrap (default 0)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples, 0 for none (default 1000)")
    parser.add_argument("--confidence", type=float, default=None, help="interval level (default 0.95)")
    parser.add_argument("--calibration", default=None,
                        help="calibration: a fraction of each benchmark's prompts (default 0.3) or a benchmark name")
    parser.add_argument("--layers", default=None, help="comma-separated layers to report (default: every latent_sim_<L> column)")


def run(args: argparse.Namespace) -> int:
    """Run ``dabon report`` with parsed arguments; return the process exit code."""
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    settings = read_run_config(run_dir)
    for key in ("seed", "bootstrap", "confidence"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.calibration is not None:
        chosen = parse_calibration(args.calibration)
        if chosen.benchmark is None:
            settings.update(calibration_fraction=chosen.fraction, calibration_benchmark=None)
        else:
            settings["calibration_benchmark"] = chosen.benchmark
    config = ReportSettings(**settings)
    layers = None
    if args.layers:
        from pipelines.score import parse_int_list

        try:
            layers = parse_int_list(args.layers, "--layers")
        except argparse.ArgumentTypeError as err:
            raise ValueError(str(err)) from None
    frame = load_shards(run_dir)
    metrics = compute_metrics(
        frame, layers, config.seed, config.bootstrap, config.calibration,
        confidence=config.confidence, is_refusal=keyword_refusal,
    )
    paths = write_report(run_dir, metrics, frame)
    logger.info("wrote %s and %d plots", paths["metrics"], len(paths["plots"]))
    print(paths["report"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.report``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from pipelines.cli import run_guarded

    return run_guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
