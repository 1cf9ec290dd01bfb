"""``dabon report``: ``report.md``, plots and ``metrics.json`` of an evaluation run, from its stored shards.

Launch::

    dabon report runs/eval-qwen-0.5b                      # rebuild metrics.json, report.md, plots/
    python -m pipelines.report runs/eval-qwen-0.5b --bootstrap 2000 --calibration 0.3
    python -m pipelines.report runs/eval-qwen-0.5b --calibration wildjailbreak   # calibrate on another benchmark
    dabon report runs/eval-qwen-0.5b --threshold 0.02     # add the budgeted selector (tau from `dabon budget`)

Input: ``RUN_DIR/samples/**/*.parquet`` (rows as ``pipelines.metrics`` describes them) and
``RUN_DIR/config.yaml``, the resolved config ``pipelines.evaluate`` saved: its ``report:``
section (seed, bootstrap, confidence, calibration) and ``scoring.layers`` are the defaults that
flags override; ``prompt.response_prefix`` is put back in front of every stored response before
the answer rule reads it (``actors.chat.parse_response``), ``judge.name`` is named in the report,
and ``prompt`` is compared with the adapter's own ``prompt.yaml`` (``model.adapter``).

Output in ``RUN_DIR``: ``metrics.json`` (all numbers as fractions, see
``pipelines.metrics.compute_metrics``; each benchmark's ``detector``: ``pipelines.detector``),
``report.md`` (tables) and ``plots/<benchmark>/*.png`` (score densities for safe vs unsafe samples,
ASR by layer, ASR vs N, within-prompt AUROC by layer) and ``plots/asr_vs_over_refusal.png`` (the
run-level safety / cost plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from actors import storage
from actors.chat import PROMPT_FILE, adapter_prompt, prompt_differences
from actors.config import ConfigError, PromptConfig, ReportConfig, validate
from actors.judge import count_refusal_classes
from actors.scorer import latent_column
from actors.scores import column_score, registered
from actors.settings import get_logger
from pipelines.args import add_output_arguments, command_main, parse_int_list
from pipelines.data import read_prompt_counts
from pipelines.detector import detector_metrics, layer_series
from pipelines.detector import markdown_lines as detector_lines
from pipelines.metrics import (
    BUDGETED_PREFIX,
    CALIBRATED_PICKS,
    ORACLE_BEST_LABEL,
    ORACLE_MAJORITY,
    PICK_FLAGS,
    ReportInputError,
    Row,
    compute_metrics,
    keyword_refusal,
    normalise_rows,
    validate_rows,
)

logger = get_logger(__name__)

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"

# ---------------------------------------------------------------------------------------------
# Shards


def load_shards(run_dir: str, layers: Sequence[int] = ()) -> Any:
    """All ``run_dir/samples/**/*.parquet`` shards (a path or storage URI) as one pandas DataFrame, checked.

    Hidden files and folders (names starting with ``.``: writers in progress) are skipped.
    Raises ``ReportInputError`` when there is no shard, when a ``prompt_id`` repeats within a
    benchmark (listing the ids), or when a per-sample list column does not have N entries
    (naming the column and the prompt id).
    """
    import pandas as pd

    root = storage.join(run_dir, SAMPLES_DIR)
    locations = storage.list_files(root, suffix=".parquet", recursive=True)
    if not locations:
        raise ReportInputError(f"no Parquet shards under {root}")
    frame = pd.concat([storage.read_parquet(location).to_pandas() for location in locations], ignore_index=True)
    validate_rows(normalise_rows(frame), layers)
    return frame


# ---------------------------------------------------------------------------------------------
# Report: Markdown and plots


BASELINE_LABELS = {
    "single": "single (first sample)",
    "random": "random of N (expected)",
    "random_draw": "random of N (one seeded draw)",
    ORACLE_MAJORITY: "*oracle*: majority unsafe",
}


def selector_labels(layers: Sequence[int], threshold: float | None = None) -> dict[str, str]:
    """Human label of every selector name from the score registry (``actors.scores``):
    ``latent_sim_12`` -> ``latent sim, layer 12 (argmin)``, ``kl`` -> ``KL to base (argmax)``;
    with a ``threshold``, ``budgeted_latent_sim_12`` -> ``budgeted latent sim, layer 12 (tau=X)``."""
    labels = dict(BASELINE_LABELS)
    for score in registered().values():
        if score.per_layer:
            labels.update({score.column(layer): score.selector_label(layer) for layer in layers})
        else:
            labels[score.name] = score.selector_label()
    if threshold is not None:
        labels.update({BUDGETED_PREFIX + name: f"budgeted {label.rsplit(' (', 1)[0]} (tau={threshold:g})"
                       for name, label in list(labels.items()) if name not in BASELINE_LABELS})
    return labels


def layer_selectors(entry: Mapping[str, Any], layers: Sequence[int]) -> list[tuple[int, str]]:
    """``(layer, selector name)`` of the latent selectors a benchmark's metrics hold, by layer."""
    return [(layer, latent_column(layer)) for layer in layers if latent_column(layer) in entry.get("asr", {})]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _signed_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:+.1f} pp"


FLAG_MARK = "†"  # an interval over fewer than 30 prompts or of zero width (``pipelines.metrics.interval_flags``)


def _interval(values: Sequence[float] | None, signed: bool = False, flags: Sequence[str] | None = None) -> str:
    if values is None:
        return "n/a"
    mark = FLAG_MARK if flags else ""
    if signed:
        return f"[{100.0 * values[0]:+.1f}, {100.0 * values[1]:+.1f}] pp{mark}"
    return f"[{100.0 * values[0]:.1f}, {100.0 * values[1]:.1f}]%{mark}"


def _ci(entry: Mapping[str, Any], key: str, name: str, signed: bool = False) -> str:
    """The interval ``entry[key][name]`` with its flag mark (``entry[key + "_flags"][name]``)."""
    return _interval((entry.get(key) or {}).get(name), signed, (entry.get(f"{key}_flags") or {}).get(name))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _judge_text(judge: Mapping[str, Any] | None) -> str:
    if not judge or not judge.get("name"):
        return f"not recorded (no {CONFIG_FILE} in the run directory)"
    options = ", ".join(f"{key}={value}" for key, value in (judge.get("options") or {}).items()
                        if isinstance(value, (str, int, float, bool)))
    return f"`{judge['name']}`" + (f" ({options})" if options else "")


def _prompt_lines(prompt: Mapping[str, Any] | None) -> list[str]:
    if not prompt:
        return []
    system = prompt.get("system_prompt")
    system_text = "the chat template's default" if system is None else f"`{system!r}`"
    return [f"Prompt: system prompt {system_text}, response prefix `{prompt.get('response_prefix', '')!r}`: "
            f"{prompt.get('note', '')}.", ""]


PICK_LABELS = {"truncated": "truncated (finish reason `length`)", "unfinished": "unfinished (reasoning never closed)",
               "empty": "empty (no generated token)"}
POLICY_JUDGE = "unfinished = judge's verdict"
POLICY_UNSAFE = "unfinished = unsafe"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "benchmark"


HOW_TO_READ = [
    "## How to read",
    "",
    "- **ASR** (attack success rate): share of harmful prompts whose selected response the judge calls unsafe. Lower is better.",
    "- An **unfinished** sample opened a reasoning (by the response prefix or in its text) and never closed it: it has "
    f"no answer. ASR is shown under two policies side by side: *{POLICY_JUDGE}* counts it as the judge said (the "
    f"keyword judge calls it safe unless `unfinished: unsafe`), *{POLICY_UNSAFE}* counts every unfinished chosen "
    "sample unsafe. Differences and relative drops are for the judge's verdict.",
    "- **What each selector picks**: share of harmful prompts whose chosen sample was cut off at the token limit "
    "(*truncated*), never closed its reasoning (*unfinished*) or is *empty*. A selector that lowers ASR by picking "
    "such samples picks non-answers, not safer answers.",
    "- **Selectors** pick one of the N stored samples per prompt: *single* is the first sample (single sampling); "
    "*random of N (expected)* is the expectation of a uniform pick: per prompt, the share of unsafe (or answered, "
    "or flagged) samples among the eligible ones, the paired baseline of every Δ vs random; *one seeded draw* is "
    "a single such pick, shown to see how far one draw falls from it. Every selector, baselines included, chooses "
    "among the eligible samples: the non-empty ones (all when all N are empty); score selectors use argmin (latent similarity, perplexity) or argmax "
    "(KL, self-certainty); missing scores are skipped and ties go to the lowest index.",
    "- Rows marked ***oracle*** use the judge labels and are not deployable: *majority unsafe* counts a prompt "
    "unsafe when more than half of its N samples are; the *best layer on test* is chosen on the labels it is scored on.",
    "- **Relative drop** = (single - x) / single: positive means fewer unsafe answers than single sampling. "
    "**Δ vs single** = x - single in percentage points, with a paired bootstrap interval (same resampled prompts for both); "
    "**Δ vs random** = x - the expected random of N, the same way (on the calibrated layer's test prompts in its table).",
    "- Intervals: a rate of one pick per prompt gets a Wilson score interval; the expected random of N (a share per "
    "prompt) a percentile bootstrap over prompts; differences and relative drops a paired bootstrap (resamples where "
    "single is 0 have no relative drop and are skipped). "
    f"{FLAG_MARK} marks an interval over fewer than 30 prompts or of zero width: read it with care. "
    "The **calibrated layer** is chosen on calibration prompts only and scored on the disjoint test prompts.",
    "- **Safety and cost** (first table): per selector, ASR beside the **over-refusal** on every benign prompt of the "
    "run (share whose chosen sample is refused; unfinished counts as refused; n/a where the benign prompts lack the "
    "selector's score), each with its paired difference to the expected random of N, and the generated tokens of the "
    "chosen answer against random's (above 1×: the selector prefers longer answers).",
    "- **ASR vs N** applies each selector to the first n stored samples (i.i.d., so distributed as an n-sample run).",
    "- **Utility**: GSM8K exact match of the final number, MMLU letter accuracy, and the answer rate (share not refused) "
    "on benign prompts, graded on the answer after the reasoning (`</think>`, with the response prefix put back in "
    "front of the stored text); an unfinished sample has no answer (wrong, or refused). Here a positive relative "
    "drop means *lower* utility than single sampling.",
    "",
]


def _vs_random(entry: Mapping[str, Any], name: str) -> list[str]:
    """The paired difference to the expected random of N under both unfinished policies, with intervals
    (empty cells for random itself)."""
    if name == "random":
        return ["", "", "", ""]
    cells = []
    for key in ("diff_vs_random", "diff_vs_random_unfinished_unsafe"):
        cells += [_signed_pct((entry.get(key) or {}).get(name)), _ci(entry, f"{key}_ci", name, signed=True)]
    return cells


def _judge_error_lines(errors: Mapping[str, Any] | None, labels: Mapping[str, str]) -> list[str]:
    """How many judged samples had a judge parse failure, and how many chosen samples per selector."""
    if errors is None:
        return ["Judge parse failures: not recorded (shards without `judge_error`).", ""]
    if not errors["samples"]:
        return [f"Judge parse failures: none of {errors['of']} judged samples.", ""]
    chosen = ", ".join(f"{labels.get(name, name)} {count:.2f}" if isinstance(count, float) else f"{labels.get(name, name)} {count}"
                       for name, count in errors["selected"].items())
    return [f"Judge parse failures: {errors['samples']} of {errors['of']} judged samples ({errors['prompts']} prompts); "
            f"their verdict is the `on_parse_error` policy's, not the judge's. Chosen samples with one, per selector "
            f"(prompts; random: expected): {chosen}.", ""]


def _safety_section(entry: Mapping[str, Any], labels: Mapping[str, str], judge_text: str,
                    scored_layers: Sequence[int]) -> list[str]:
    """The attack-success tables of one benchmark: ASR per selector under both unfinished policies,
    what each selector picks, latent similarity by layer, the calibrated layer, ASR against N."""
    lines: list[str] = []
    lines += [f"### Attack success rate ({entry['asr_prompts']} judged harmful prompts, judge {judge_text})", ""]
    strict, strict_ci = entry.get("asr_unfinished_unsafe") or {}, entry.get("asr_unfinished_unsafe_ci") or {}
    rows = []
    for name, value in entry["asr"].items():
        rows.append([
            labels.get(name, name), _pct(value), _ci(entry, "asr_ci", name),
            _pct(strict.get(name)), _ci(entry, "asr_unfinished_unsafe_ci", name),
            _signed_pct(entry["diff_vs_single"].get(name)) if name != "single" else "",
            _ci(entry, "diff_vs_single_ci", name, signed=True) if name != "single" else "",
            _pct(entry["relative_drop"].get(name)) if name != "single" else "",
            _ci(entry, "relative_drop_ci", name) if name != "single" else "",
            *_vs_random(entry, name),
        ])
    lines += _table([
        "selector", f"ASR, {POLICY_JUDGE}", "95% CI", f"ASR, {POLICY_UNSAFE}", "95% CI",
        "Δ vs single", "95% CI of Δ", "relative drop", "95% CI of drop",
        f"Δ vs random, {POLICY_JUDGE}", "95% CI", f"Δ vs random, {POLICY_UNSAFE}", "95% CI",
    ], rows)
    if entry.get("relative_drop_skipped"):
        lines += [f"Relative-drop intervals skip {entry['relative_drop_skipped']} resamples in which single's ASR is 0.", ""]
    lines += _judge_error_lines(entry.get("judge_errors"), labels)
    shares = entry.get("pick_shares")
    if shares:
        calibrated = entry.get("calibrated_layer") or {}
        share_labels = {**labels, CALIBRATED_PICKS: f"calibrated layer {calibrated.get('layer')} "
                                                    f"(on its {calibrated.get('test_prompts')} test prompts)"}
        lines += ["### What each selector picks", ""]
        lines += _table(["selector", *(PICK_LABELS[flag] for flag in PICK_FLAGS)],
                        [[share_labels.get(name, name), *(_pct(values.get(flag)) for flag in PICK_FLAGS)]
                         for name, values in shares.items()])
    layer_names = layer_selectors(entry, scored_layers)
    if layer_names:
        lines += ["### Latent similarity by layer", ""]
        lines += _table(
            ["layer", "ASR", "95% CI", "relative drop"],
            [[str(layer), _pct(entry["asr"][name]), _ci(entry, "asr_ci", name),
              _pct(entry["relative_drop"][name])] for layer, name in layer_names],
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
            strict = calibrated.get("asr_test_unfinished_unsafe") or {}
            strict_ci = calibrated.get("asr_test_unfinished_unsafe_ci") or {}
            oracle = entry.get("oracle_best_layer") or {}
            def test_row(label: str, layer: str, name: str) -> list[str]:
                return [label, layer, _pct(test.get(name)), _ci(calibrated, "asr_test_ci", name),
                        _pct(strict.get(name)), _ci(calibrated, "asr_test_unfinished_unsafe_ci", name),
                        _pct(calibrated["relative_drop"].get(name)) if name != "single" else "",
                        *(_vs_random(calibrated, name) if name != "single" else ["", "", "", ""])]

            rows = [test_row("single (first sample)", "", "single")]
            if "random" in test:
                rows.append(test_row(BASELINE_LABELS["random"], "", "random"))
            rows.append(test_row("calibrated layer", str(calibrated["layer"]), "latent_sim"))
            rows.append([f"*oracle* best layer on test: {ORACLE_BEST_LABEL}", str(oracle.get("layer")),
                         _pct(oracle.get("asr")), _interval(oracle.get("asr_ci"), flags=oracle.get("asr_ci_flags")), "", "",
                         _pct(oracle.get("relative_drop")), "", "", "", ""])
            lines += _table(
                ["", "layer", f"ASR on test, {POLICY_JUDGE}", "95% CI", f"ASR on test, {POLICY_UNSAFE}", "95% CI",
                 "relative drop", f"Δ vs random, {POLICY_JUDGE}", "95% CI", f"Δ vs random, {POLICY_UNSAFE}", "95% CI"],
                rows,
            )
    series = entry.get("asr_vs_n")
    if series:
        names = [name for name in series if name != "n"]
        lines += ["### ASR against N", ""]
        lines += _table(["n", *(labels.get(name, name) for name in names)],
                        [[str(n), *(_pct(series[name][i]) for name in names)] for i, n in enumerate(series["n"])])
    return lines


def _utility_section(entry: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The utility tables of one benchmark (GSM8K exact match, MMLU accuracy, benign answer rate)."""
    lines: list[str] = []
    for kind, utility in entry.get("utility", {}).items():
        lines += [f"### Utility: {utility['metric']} ({kind}, {utility['prompts']} prompts)", ""]
        if "skipped" in utility:
            lines += [f"Skipped: {utility['skipped']}.", ""]
            continue
        rows = []
        for name, value in utility["value"].items():
            rows.append([
                labels.get(name, name), _pct(value), _ci(utility, "value_ci", name),
                _signed_pct(utility["diff_vs_single"].get(name)) if name != "single" else "",
                _pct(utility["relative_drop"].get(name)) if name != "single" else "",
            ])
        lines += _table(["selector", utility["metric"], "95% CI", "Δ vs single", "relative drop"], rows)
    return lines


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _tokens(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _tradeoff_section(tradeoff: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The run-level safety / cost table, first in the report: per selector ASR under both unfinished
    policies and the over-refusal on the run's benign prompts, each with its interval and paired
    difference to random, and the selected answer's length against random's."""
    lines: list[str] = []
    for bench, entry in tradeoff.items():
        benign = ", ".join(entry["benign_benchmarks"]) or "none"
        lines += [f"## Safety and cost: {bench}", "",
                  f"ASR on {entry['asr_prompts']} judged harmful prompts of {bench}; over-refusal on "
                  f"{entry['benign_prompts']} benign prompts of the run ({benign}): the share whose chosen sample is "
                  "refused (an unfinished reasoning counts as refused). Tokens: generated tokens of the chosen answer "
                  f"on the harmful prompts; all N generated {_tokens(entry.get('tokens_all_n'))} tokens per prompt.", ""]
        if entry.get("note"):
            lines += [f"Over-refusal not available: {entry['note']}.", ""]
        rows = []
        for name in entry["selectors"]:
            rows.append([
                labels.get(name, name),
                _pct(entry["asr"].get(name)), _ci(entry, "asr_ci", name),
                _pct(entry["asr_unfinished_unsafe"].get(name)), _ci(entry, "asr_unfinished_unsafe_ci", name),
                *_vs_random(entry, name),
                _pct(entry["over_refusal"].get(name)), _ci(entry, "over_refusal_ci", name),
                *(["", ""] if name == "random" else
                  [_signed_pct(entry["over_refusal_diff_vs_random"].get(name)),
                   _ci(entry, "over_refusal_diff_vs_random_ci", name, signed=True)]),
                _tokens(entry["tokens_selected"].get(name)), _ratio(entry["length_ratio"].get(name)),
            ])
        lines += _table([
            "selector", f"ASR, {POLICY_JUDGE}", "95% CI", f"ASR, {POLICY_UNSAFE}", "95% CI",
            f"Δ ASR vs random, {POLICY_JUDGE}", "95% CI", f"Δ ASR vs random, {POLICY_UNSAFE}", "95% CI", "over-refusal", "95% CI", "Δ over-refusal vs random", "95% CI",
            "tokens / chosen answer", "vs random",
        ], rows)
    return lines


def render_markdown(metrics: Mapping[str, Any], plots: Mapping[str, list[str]] | None = None) -> str:
    """``report.md`` text from ``compute_metrics`` output; ``plots`` maps a benchmark to PNG paths relative to the report."""
    settings = metrics.get("settings", {})
    calibration = settings.get("calibration") or {}
    where = (f"benchmark {calibration['benchmark']}" if calibration.get("benchmark")
             else f"{calibration.get('fraction')} of each benchmark's prompts (hash of prompt_id)")
    scored_layers = list(settings.get("layers") or [])
    labels = selector_labels(scored_layers, settings.get("threshold"))
    layers = ", ".join(map(str, scored_layers)) or "none"
    judge_text = _judge_text(metrics.get("judge"))
    lines = [
        "# Evaluation report",
        "",
        f"Settings: seed {settings.get('seed')}, {settings.get('bootstrap')} bootstrap resamples, "
        f"{100 * settings.get('confidence', 0.95):g}% intervals, layers {layers}, calibration on {where}.",
        "",
        *_prompt_lines(metrics.get("prompt")),
        f"Judge: {judge_text}.",
        "",
        *HOW_TO_READ,
        *_tradeoff_section(metrics.get("tradeoff") or {}, labels),
    ]
    for path in (plots or {}).get(TRADEOFF_PLOT_KEY, []):
        lines += [f"![{Path(path).stem}]({path})", ""]
    for bench, entry in metrics["benchmarks"].items():
        lines += [f"## {bench}", ""]
        kinds = ", ".join(f"{count} {kind}" for kind, count in entry.get("kinds", {}).items())
        dropped = entry.get("prompt_counts") or {}
        lines += [f"{entry['n_prompts']} prompts ({kinds}), N = {entry['n_samples']} samples each."
                  + (f" Data: {'; '.join(entry['sources'])}." if entry.get("sources") else "")
                  + (f" Dropped before sampling: {dropped['dropped_long']} of {dropped['in_part']} prompts longer than "
                     f"max_prompt_chars={dropped['max_prompt_chars']}." if dropped.get("max_prompt_chars") else "")
                  + (" Refusal judge on the benign samples: " + ", ".join(f"{count} {label}" for label, count in
                     sorted(entry["refusal_classes"].items())) + "." if entry.get("refusal_classes") else ""), ""]
        if entry.get("engine_error_prompts"):
            lines += [f"{entry['engine_error_prompts']} more prompts are left out of every number: the engine failed on "
                      "one of their samples (`sample_errors` in the shards names why).", ""]
        if "asr" in entry:
            lines += _safety_section(entry, labels, judge_text, scored_layers)
        elif entry.get("kinds", {}).get("harmful"):
            lines += ["No judge labels (`judge_unsafe`) for the harmful prompts: no ASR.", ""]
        lines += _utility_section(entry, labels)
        if entry.get("detector"):
            lines += detector_lines(entry["detector"], labels, settings.get("confidence", 0.95))
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


def _save(figure: Any, run_dir: str, relative: str) -> str:
    """Write the figure as PNG to ``run_dir/relative`` (atomically, any storage); returns ``relative``."""
    import io

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes(storage.join(run_dir, *relative.split("/")), buffer.getvalue())
    return relative


TRADEOFF_PLOT_KEY = ""  # write_plots' key of the run-level plot (no benchmark has an empty name)


def _tradeoff_plot(run_dir: str, tradeoff: Mapping[str, Any], labels: Mapping[str, str]) -> str | None:
    """``plots/asr_vs_over_refusal.png``: ASR (y) against over-refusal (x), one point per selector
    (each latent layer its own point) and benchmark, error bars from the intervals."""
    points = [(bench, name, entry) for bench, entry in tradeoff.items() for name in entry["selectors"]
              if entry["over_refusal"].get(name) is not None and entry["asr"].get(name) is not None]
    if not points:
        return None
    figure, axes = _new_figure(7.0, 5.0)
    for bench, name, entry in points:
        x, y = entry["over_refusal"][name], entry["asr"][name]

        def bar(value: float, interval: Sequence[float] | None) -> Any:
            return None if interval is None else [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]]

        axes.errorbar([x], [y], xerr=bar(x, entry["over_refusal_ci"].get(name)), yerr=bar(y, entry["asr_ci"].get(name)),
                      marker="o", capsize=3, linestyle="none",
                      label=(f"{bench}: " if len(tradeoff) > 1 else "") + labels.get(name, name).replace("*", ""))
    axes.set_xlabel("over-refusal on benign prompts")
    axes.set_ylabel("ASR (unfinished = judge's verdict)")
    axes.set_title("ASR against over-refusal, per selector")
    axes.legend(fontsize="x-small")
    return _save(figure, run_dir, "plots/asr_vs_over_refusal.png")


def write_plots(run_dir: str, metrics: Mapping[str, Any], rows: Sequence[Row]) -> dict[str, list[str]]:
    """PNG plots per benchmark under ``run_dir/plots/<benchmark>/``; returns benchmark -> paths
    relative to ``run_dir``.

    ``score_density_<column>.png`` (safe vs unsafe samples of judged harmful prompts, one per
    score column), ``asr_by_layer.png`` (with interval bars), ``asr_vs_n.png``,
    ``detector_auroc_by_layer.png`` (within-prompt AUROC per layer, safety vs refusal); once per
    run, ``plots/asr_vs_over_refusal.png`` under the key ``""`` (``TRADEOFF_PLOT_KEY``) when the
    run has benign prompts whose over-refusal was measured.
    """
    scored_layers = list(metrics.get("settings", {}).get("layers") or [])
    labels = selector_labels(scored_layers, metrics.get("settings", {}).get("threshold"))
    written: dict[str, list[str]] = {}
    tradeoff_path = _tradeoff_plot(run_dir, metrics.get("tradeoff") or {}, labels)
    if tradeoff_path:
        written[TRADEOFF_PLOT_KEY] = [tradeoff_path]
    for bench, entry in metrics["benchmarks"].items():
        if "asr" not in entry:
            continue
        folder = f"plots/{_file_stem(bench)}"
        paths: list[str] = []
        harmful = [row for row in rows if str(row["benchmark"]) == bench and row["kind"] == "harmful"
                   and row.get("judge_unsafe") is not None]
        score_columns = [name for name in entry["selectors"] if column_score(name) is not None]
        for column in score_columns:
            groups = {"safe": [], "unsafe": []}
            for row in harmful:
                for flag, score in zip(row["judge_unsafe"], row[column]):
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
            paths.append(_save(figure, run_dir, f"{folder}/score_density_{column}.png"))
        layer_names = [name for _, name in layer_selectors(entry, scored_layers)]
        if layer_names:
            figure, axes = _new_figure()
            layers = [layer for layer, _ in layer_selectors(entry, scored_layers)]
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
            paths.append(_save(figure, run_dir, f"{folder}/asr_by_layer.png"))
        series = entry["asr_vs_n"]
        figure, axes = _new_figure()
        for name in [n for n in series if n != "n"]:
            style = "--" if name == ORACLE_MAJORITY else "-"
            axes.plot(series["n"], series[name], marker="o", linestyle=style, label=labels.get(name, name).replace("*", ""))
        axes.set_xticks(series["n"])
        axes.set_xlabel("N (first n stored samples)")
        axes.set_ylabel("ASR")
        axes.set_title(f"{bench}: ASR against N")
        axes.legend(fontsize="small")
        paths.append(_save(figure, run_dir, f"{folder}/asr_vs_n.png"))
        written[bench] = paths
    for bench, entry in metrics["benchmarks"].items():
        path = _detector_plot(run_dir, bench, entry, scored_layers)
        if path:
            written.setdefault(bench, []).append(path)
    return written


def _detector_plot(run_dir: str, bench: str, entry: Mapping[str, Any], layers: Sequence[int]) -> str | None:
    """``detector_auroc_by_layer.png``: the within-prompt AUROC of latent similarity per layer,
    safety (safe over unsafe) beside refusal (answer over refusal), with interval bars."""
    series = layer_series(entry.get("detector") or {}, latent_column, layers)
    if not series["layers"]:
        return None
    figure, axes = _new_figure()
    for side, label, color in (("safety", "safety: safe over unsafe", "tab:blue"),
                               ("refusal", "refusal: answer over refusal", "tab:orange")):
        points = [(layer, value, ci) for layer, (value, ci) in zip(series["layers"], series[side]) if value is not None]
        if not points:
            continue
        errors = np.clip(np.array([[v - (ci or [v, v])[0] for _, v, ci in points],
                                   [(ci or [v, v])[1] - v for _, v, ci in points]]), 0.0, None)
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, marker="o", capsize=3, color=color,
                      label=label)
    axes.axhline(0.5, color="gray", linestyle=":", label="chance")
    axes.set_xticks(series["layers"])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("layer")
    axes.set_ylabel("within-prompt AUROC (latent sim, argmin)")
    axes.set_title(f"{bench}: detector quality within a prompt")
    axes.legend(fontsize="small")
    return _save(figure, run_dir, f"plots/{_file_stem(bench)}/detector_auroc_by_layer.png")


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


def write_report(run_dir: str, metrics: Mapping[str, Any], rows: Sequence[Row] | Any) -> dict[str, Any]:
    """Write ``metrics.json``, ``report.md`` and ``plots/`` under ``run_dir`` (a path or URI), each
    file atomically.

    Inputs: ``compute_metrics`` output and the rows it was computed from (for the score
    densities). Output: ``{"metrics": location, "report": location, "plots": [locations]}``.
    """
    table = normalise_rows(rows)
    plots = write_plots(run_dir, metrics, table)
    metrics_at = storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(_json_ready(metrics), indent=2) + "\n")
    report_at = storage.write_text(storage.join(run_dir, "report.md"), render_markdown(metrics, plots))
    return {"metrics": metrics_at, "report": report_at,
            "plots": [storage.join(run_dir, path) for paths in plots.values() for path in paths]}


def describe_prompt(prompt: PromptConfig | None, adapter: str | None) -> dict[str, Any]:
    """Which prompt a run used and whether it is the adapter's training prompt (``metrics["prompt"]``).

    Inputs: the run's prompt section (``None``: the run saved no config) and its ``model.adapter``.
    Output: ``system_prompt``, ``response_prefix``, ``adapter``, ``is_adapter_prompt`` (``True``,
    ``False``, or ``None`` when there is nothing to compare with), ``differs_in`` (field names)
    and ``note``, a sentence for the report. An adapter whose ``prompt.yaml`` cannot be read is
    said so in the note; it never fails the report.
    """
    entry: dict[str, Any] = {
        "system_prompt": None if prompt is None else prompt.system_prompt,
        "response_prefix": "" if prompt is None else prompt.response_prefix,
        "adapter": adapter,
        "is_adapter_prompt": None,
        "differs_in": [],
    }
    if prompt is None:
        entry["note"] = f"not recorded (no {CONFIG_FILE} in the run directory): answers were read with no response prefix"
        return entry
    if not adapter:
        entry["note"] = "the run has no adapter (a base model or a full fine-tuned copy): no training prompt to compare with"
        return entry
    try:
        if not storage.exists(adapter):
            entry["note"] = f"the adapter {adapter} is not reachable from here: not compared with its {PROMPT_FILE}"
            return entry
        trained = adapter_prompt(adapter)
    except Exception as error:  # an unreadable adapter must not cost the whole report
        logger.warning("could not read the prompt of adapter %s: %s", adapter, error)
        entry["note"] = f"the adapter's {PROMPT_FILE} could not be read ({type(error).__name__}: {error}): not compared"
        return entry
    if trained is None:
        entry["note"] = f"the adapter saved no {PROMPT_FILE}"
        return entry
    entry["differs_in"] = prompt_differences(prompt, trained)
    entry["is_adapter_prompt"] = not entry["differs_in"]
    entry["note"] = (f"the adapter's {PROMPT_FILE}" if not entry["differs_in"]
                     else f"differs from the adapter's {PROMPT_FILE} in: {', '.join(entry['differs_in'])}")
    return entry


def describe_judge(judge: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The run's judge for ``metrics["judge"]``: ``{"name", "options"}`` from its ``judge`` section
    (a mapping or a ``JudgeConfig``); ``name`` is ``None`` when the run did not record it."""
    if judge is None:
        return {"name": None, "options": {}}
    if hasattr(judge, "model_dump"):
        judge = judge.model_dump(mode="json")
    if not isinstance(judge, Mapping):
        raise ReportInputError(f"judge: expected the run's judge section (name, options), got {judge!r}")
    options = judge.get("options") or {}
    if not isinstance(options, Mapping):
        raise ReportInputError(f"judge.options: expected a mapping, got {options!r}")
    return {"name": judge.get("name") or "keyword", "options": dict(options)}


def build_report(
    run_dir: str,
    layers: Sequence[int],
    report: ReportConfig,
    *,
    prompt: PromptConfig | None = None,
    adapter: str | None = None,
    judge: Mapping[str, Any] | Any | None = None,
) -> dict[str, Any]:
    """Metrics from the shards in ``run_dir`` (``compute_metrics``, and each benchmark's
    ``detector`` numbers from ``pipelines.detector``), written as ``write_report`` does; returns them.

    ``prompt``: the run's prompt section; its ``response_prefix`` goes in front of every stored
    response for the answer rule (``None``: no prefix, and the report says the prompt is not
    recorded). ``adapter``: the run's ``model.adapter``, whose ``prompt.yaml`` the prompt is
    compared with. ``judge``: the run's judge section, named in the report.
    """
    frame = load_shards(run_dir, layers)
    response_prefix = "" if prompt is None else prompt.response_prefix
    metrics = compute_metrics(frame, layers, report, is_refusal=keyword_refusal, response_prefix=response_prefix)
    for bench, detector in detector_metrics(frame, layers, report, is_refusal=keyword_refusal,
                                            response_prefix=response_prefix).items():
        metrics["benchmarks"][bench]["detector"] = detector
    metrics["prompt"] = describe_prompt(prompt, adapter)
    metrics["judge"] = describe_judge(judge)
    for bench, counts in read_prompt_counts(run_dir).items():  # what the loaders kept and dropped
        metrics["benchmarks"].get(bench, {})["prompt_counts"] = counts
    for bench, classes in count_refusal_classes(normalise_rows(frame)).items():  # parse errors counted
        metrics["benchmarks"].get(bench, {})["refusal_classes"] = classes
    write_report(run_dir, metrics, frame)
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the report needs from a run's saved ``config.yaml``: the scored ``layers``, the
    ``report`` settings, the ``prompt`` section (``None`` when no config was saved), the
    ``adapter`` and the ``judge`` section (``None`` when not recorded)."""

    layers: list[int]
    report: ReportConfig
    prompt: PromptConfig | None = None
    adapter: str | None = None
    judge: Mapping[str, Any] | None = None


def read_run_context(run_dir: str) -> RunContext:
    """The ``RunContext`` of the config an evaluation saved in ``run_dir``, validated as the run's
    own type (``pipelines.eval_config.EvalConfig``: its layers rule ``scored_layers``, its
    ``scoring.plugins`` registered); defaults and no prompt when there is no saved config. A
    malformed config is an error naming the full dotted key."""
    from pipelines.eval_config import EvalConfig

    location = storage.join(run_dir, CONFIG_FILE)
    if not storage.is_file(location):
        return RunContext([], ReportConfig())
    import yaml

    try:
        data = yaml.safe_load(storage.read_text(location)) or {}
    except yaml.YAMLError as err:
        raise ReportInputError(f"{location}: not valid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise ReportInputError(f"{location}: expected a mapping at the top level")
    try:
        config = validate(EvalConfig, dict(data))
    except ConfigError as err:
        raise ConfigError(f"{location}: {err}") from None
    return RunContext(
        layers=config.scored_layers,
        report=config.report,
        prompt=config.prompt,
        adapter=config.model.adapter or None,
        judge=config.judge.model_dump(mode="json"),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon report`` options (unset flags fall back to the run's config, then defaults)."""
    parser.add_argument("run_dir", help="run directory (path or storage URI) with samples/*.parquet; outputs go there")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random selector and the bootstrap (default: the run's)")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples, 0 for none (default: the run's)")
    parser.add_argument("--confidence", type=float, default=None, help="interval level (default: the run's, 0.95)")
    parser.add_argument("--calibration", default=None,
                        help="calibration: a fraction of each benchmark's prompts (e.g. 0.3) or a benchmark name")
    parser.add_argument("--layers", default=None, help="comma-separated layers to report (default: the run's scoring.layers)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="add the budgeted selector with this threshold (report.threshold; `dabon budget` chooses it)")
    parser.add_argument("--threshold-score", default=None,
                        help="the score column it gates (report.threshold_score; default latent_sim at the first layer)")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``dabon report`` with parsed arguments; return the process exit code."""
    from actors.runtime import quiet_libraries

    quiet_libraries(args.verbose)
    run_dir: str = args.run_dir
    if not storage.exists(run_dir):
        raise ReportInputError(f"run directory {run_dir} does not exist")
    context = read_run_context(run_dir)
    layers, report = context.layers, context.report
    updates = {key: getattr(args, key) for key in ("seed", "bootstrap", "confidence", "threshold", "threshold_score")
               if getattr(args, key) is not None}
    if args.calibration is not None:
        try:
            updates.update(calibration_fraction=float(args.calibration), calibration_benchmark=None)
        except ValueError:
            updates["calibration_benchmark"] = args.calibration
    report = validate(ReportConfig, {**report.model_dump(), **updates}, "report")
    if args.layers:
        chosen = parse_int_list(args.layers, "--layers")
        missing = sorted(set(chosen) - set(layers))
        if missing:
            raise ReportInputError(f"--layers: {missing} were not scored in this run (scoring.layers: {layers})")
        layers = chosen
    build_report(run_dir, layers, report, prompt=context.prompt, adapter=context.adapter, judge=context.judge)
    logger.info("wrote %s", storage.join(run_dir, "metrics.json"))
    print(storage.join(run_dir, "report.md"))
    return 0


main = command_main("python -m pipelines.report", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
