"""``dabon quickstart``: distil SmolLM2, evaluate it with Best-of-N on jailbreak prompts, print the table.

Launch (from the repository root; on 2 cores about 10 minutes of distillation and 15 of evaluation)::

    dabon quickstart
    dabon quickstart --distill-config recipes/quickstart.yaml --eval-config recipes/quickstart-eval.yaml

Runs ``recipes/quickstart.yaml`` (replayed STAR-1 traces on the train split -> keyword filter ->
LoRA SFT on a local Ray, trained for the number of steps that ``recipes/quickstart-sweep.yaml``
chose on development prompts), then ``recipes/quickstart-eval.yaml`` with the adapter it wrote: a
seeded sample of the *test* part of the offline DAN jailbreak prompts (disjoint from the sweep's),
N samples each, judged and scored, and GSM8K questions asked as benign requests (from GSM8K's
*test* part; the distillation trains on its *train* part, the sweep chose on its *dev* part);
then the base model alone on those benign prompts, one sample each, for its benign answer rate. The table names the judge and shows
single, random and latent Best-of-N (and the majority oracle) with 95% intervals, with unfinished
reasoning counted safe (the judge's verdict) and counted unsafe, the paired difference latent minus
random, the share of picks that are truncated / unfinished / empty, utility, then ASR and
over-refusal side by side with intervals and paired differences to random for single, random, latent
and the budgeted selector (``report.threshold`` of the evaluation recipe), the benign answer rate
of the base model beside the student's, and the wall time of each stage. Both stages skip what is already on disk, so a rerun after an interruption continues
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from actors.config import build_config, load_config, read_yaml
from actors.scores import column_score
from pipelines.metrics import BUDGETED_PREFIX
from pipelines.args import add_output_arguments, command_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
POLICIES = (("asr", "unfinished = safe (judge)"), ("asr_unfinished_unsafe", "unfinished = unsafe"))
FLAGS = ("truncated", "unfinished", "empty")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon quickstart`` options."""
    parser.add_argument("--distill-config", type=Path, default=RECIPES / "quickstart.yaml",
                        help="distillation recipe (default recipes/quickstart.yaml)")
    parser.add_argument("--eval-config", type=Path, default=RECIPES / "quickstart-eval.yaml",
                        help="evaluation recipe (default recipes/quickstart-eval.yaml); its adapter is replaced "
                        "by the one the distillation writes")
    add_output_arguments(parser)


def _percent(value: float | None) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f}"


def _interval(interval: list[float] | None, flags: list[str] | None = None) -> str:
    """``[lo, hi]`` in percent, marked † when flagged (fewer than 30 prompts, or zero width)."""
    return "" if not interval else f"[{100 * interval[0]:5.1f}, {100 * interval[1]:5.1f}]{'†' if flags else ''}"


def _signed(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:+5.1f}"
    return f"{text} [{100 * interval[0]:+5.1f}, {100 * interval[1]:+5.1f}]" if interval else text


def latent_selector(bench: Mapping[str, Any]) -> tuple[str | None, str]:
    """The latent Best-of-N selector to show and where its layer came from: the one scored layer
    (fixed by the development sweep) on every prompt, else none (several layers: the report's
    calibrated-layer table holds the held-out number)."""
    latent = [name for name in bench.get("selectors", []) if (found := column_score(name)) and found[0].name == "latent_sim"]
    if len(latent) == 1:
        return latent[0], f"layer {column_score(latent[0])[1]}, fixed before this run (recipe scoring.layers)"
    return None, f"{len(latent)} layers scored: see the calibrated layer in report.md"


def format_table(name: str, bench: Mapping[str, Any]) -> str:
    """One benchmark's quickstart table from its ``metrics.json`` entry: ASR with intervals under
    both unfinished policies and the pick shares per selector, the paired latent - random
    difference, and utility."""
    latent, layer_note = latent_selector(bench)
    shown = ["single", "random", *([latent] if latent else []), "oracle_majority"]
    source = ", ".join(bench.get("sources") or []) or "source n/a"
    if bench.get("asr"):
        lines = [f"{name}: {bench.get('asr_prompts', 0)} harmful prompts ({source}), N={bench.get('n_samples')}; "
                 f"latent BoN = latent-similarity argmin, {layer_note}"]
    else:
        lines = [f"{name}: {bench.get('n_prompts')} prompts ({source}), N={bench.get('n_samples')}"]
    if bench.get("asr"):
        head = f"  {'selector':<16}" + "".join(f" | {label:<25}" for _, label in POLICIES) + " | picks: trunc  unfin  empty"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for selector in shown:
            cells = "".join(f" | {_percent(bench[key].get(selector))}% "
                            f"{_interval(bench[f'{key}_ci'].get(selector), bench.get(f'{key}_ci_flags', {}).get(selector)):<18}"
                            for key, _ in POLICIES)
            picks = bench.get("pick_shares", {}).get(selector)
            pick_text = ("  " + "  ".join(f"{_percent(picks.get(flag))}%" for flag in FLAGS)) if picks else "  (not a pick)"
            lines.append(f"  {selector:<16}{cells} |{pick_text}")
        if latent:
            diffs = " | ".join(f"{label}: {_signed(bench.get(f'diff_vs_random{suffix}', {}).get(latent), bench.get(f'diff_vs_random{suffix}_ci', {}).get(latent))}"
                               for suffix, label in (("", "judge"), ("_unfinished_unsafe", "unfinished unsafe")))
            lines.append(f"  latent - random (points, paired 95% interval): {diffs}")
        if bench.get("asr_prompts", 0) < 30:
            lines.append("  † fewer than 30 prompts (or a zero-width interval): read the interval with care")
    for kind, entry in (bench.get("utility") or {}).items():
        if entry.get("skipped"):
            lines.append(f"  utility ({kind}): skipped, {entry['skipped']}")
            continue
        values = entry.get("value", {})
        lines.append(f"  utility: {entry.get('metric')} on {entry.get('prompts')} {kind} prompts: "
                     + ", ".join(f"{selector} {_percent(values.get(selector))}% {_interval(entry.get('value_ci', {}).get(selector), entry.get('value_ci_flags', {}).get(selector))}"
                                 for selector in shown if selector in values))
    return "\n".join(lines)


def budgeted_selector(names: Sequence[str]) -> str | None:
    """The budgeted selector among ``names`` (``budgeted_<column>``, present when the recipe sets
    ``report.threshold``), or ``None``."""
    return next((name for name in names if name.startswith(BUDGETED_PREFIX)), None)


def _rate(side: Mapping[str, Any], key: str, selector: str) -> str:
    value = (side.get(key) or {}).get(selector)
    interval = (side.get(f"{key}_ci") or {}).get(selector)
    flags = (side.get(f"{key}_ci_flags") or {}).get(selector)
    return "n/a" if value is None else f"{_percent(value)}% {_interval(interval, flags)}"


def _difference(side: Mapping[str, Any], key: str, selector: str) -> str:
    if selector == "random":
        return "(baseline)"
    return _signed((side.get(key) or {}).get(selector), (side.get(f"{key}_ci") or {}).get(selector))


def format_tradeoff(metrics: Mapping[str, Any]) -> list[str]:
    """Safety and cost side by side (``metrics["tradeoff"]``): per benchmark with harmful prompts,
    for single, random (its expectation), latent Best-of-N and the budgeted selector, the ASR under
    both unfinished policies, the over-refusal on the run's benign prompts, each with its 95%
    interval, the paired difference of each to random, and the generated tokens per answer."""
    settings = metrics.get("settings") or {}
    lines: list[str] = []
    for name, side in (metrics.get("tradeoff") or {}).items():
        bench = (metrics.get("benchmarks") or {}).get(name, {})
        latent, _ = latent_selector(bench)
        budgeted = budgeted_selector(side.get("selectors") or [])
        shown = [selector for selector in ("single", "random", latent, budgeted) if selector]
        labels = {"single": "single", "random": "random (expected)"}
        if latent:
            labels[latent] = f"latent L{column_score(latent)[1]}"
        if budgeted:
            labels[budgeted] = f"budgeted tau={settings.get('threshold'):.4g}"
        benign = ", ".join(side.get("benign_benchmarks") or []) or "none"
        lines += [f"safety and cost: {name} ({side.get('asr_prompts')} harmful prompts) beside over-refusal on "
                  f"{side.get('benign_prompts')} benign prompts ({benign}); 95% intervals (Wilson; random: bootstrap), "
                  "differences to random paired"]
        head = (f"  {'selector':<20} | {'ASR, unfinished=safe':<22} | {'ASR, unfinished=unsafe':<22} | "
                f"{'over-refusal':<22} | {'ASR (unsafe) - random':<24} | {'over-refusal - random':<24} | tokens")
        lines += [head, "  " + "-" * (len(head) - 2)]
        for selector in shown:
            tokens = (side.get("tokens_selected") or {}).get(selector)
            lines.append(
                f"  {labels[selector]:<20} | {_rate(side, 'asr', selector):<22} | "
                f"{_rate(side, 'asr_unfinished_unsafe', selector):<22} | {_rate(side, 'over_refusal', selector):<22} | "
                f"{_difference(side, 'diff_vs_random_unfinished_unsafe', selector):<24} | "
                f"{_difference(side, 'over_refusal_diff_vs_random', selector):<24} | "
                f"{'n/a' if tokens is None else f'{tokens:.0f}'}")
        if side.get("note"):
            lines.append(f"  over-refusal: {side['note']}")
        lines.append("  over-refusal = the chosen answer is a refusal, empty or an unfinished reasoning; "
                     "tokens = generated tokens of the chosen answer; † fewer than 30 prompts or a zero-width interval")
    return lines


def benign_answer_rate(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Single sampling's benign answer rate over a run's benign benchmarks: ``{"value", "ci",
    "prompts", "benchmarks"}`` of the first benchmark that has one (``None`` when none has)."""
    for name, bench in ((metrics or {}).get("benchmarks") or {}).items():
        entry = (bench.get("utility") or {}).get("benign") or {}
        if "value" in entry:
            return {"value": entry["value"].get("single"), "ci": (entry.get("value_ci") or {}).get("single"),
                    "prompts": entry.get("prompts"), "benchmark": name}
    return None


def format_helpfulness(student: Mapping[str, Any], base: Mapping[str, Any] | None) -> list[str]:
    """The benign answer rate of single sampling for the base model and the student, side by side
    (the same answer rule for both: a refusal, an empty answer or an unfinished reasoning is no answer)."""
    ours, theirs = benign_answer_rate(student), benign_answer_rate(base)
    if ours is None:
        return []
    lines = [f"benign answer rate, single sampling, {ours['prompts']} benign prompts ({ours['benchmark']}):"]
    if theirs is not None:
        lines.append(f"  base model (its own template, no prefix, no adapter) {_percent(theirs['value'])}% "
                     f"{_interval(theirs['ci'])}")
    ratio = ("" if theirs is None or not theirs["value"] or ours["value"] is None
             else f"  ({ours['value'] / theirs['value']:.0%} of the base model's)")
    lines.append(f"  student (the adapter's prompt)                       {_percent(ours['value'])}% {_interval(ours['ci'])}{ratio}")
    return lines


def base_benign_config(data: Mapping[str, Any], eval_config: Any) -> Any:
    """The evaluation of the base model alone on the recipe's benign benchmarks (``kind: benign``):
    one sample per prompt (single sampling), its own template's prompt (no system prompt of the
    adapter, no ``<think>`` prefix: the base model does not close a reasoning it did not learn),
    into ``<output.dir>-base``. ``None`` when the recipe has no benign benchmark."""
    from pipelines.evaluate import EvalConfig

    benign = [spec.model_dump(mode="json", exclude_none=True) for spec in eval_config.benchmarks if spec.kind == "benign"]
    if not benign:
        return None
    base = {key: value for key, value in data.items() if key != "prompt"}
    base.update(benchmarks=benign, model={**dict(data.get("model") or {}), "adapter": None},
                sampling={**dict(data.get("sampling") or {}), "n": 1},
                output={**dict(data.get("output") or {}), "dir": eval_config.output.dir.rstrip("/") + "-base"})
    return build_config(EvalConfig, base, [])


def format_summary(metrics: Mapping[str, Any], timings: Mapping[str, float | None],
                   base_metrics: Mapping[str, Any] | None = None) -> str:
    """The whole printout: judge, prompt, one table per benchmark, the benign answer rate of the
    base model and the student, the wall time of each stage."""
    judge = metrics.get("judge") or {}
    prompt = metrics.get("prompt") or {}
    # long option lists (the keyword judge's markers) are counted, not printed
    options = {key: f"{len(value)} entries" if isinstance(value, list) and len(value) > 4 else value
               for key, value in (judge.get("options") or {}).items()}
    lines = [f"judge:  {judge.get('name', 'n/a')} {json.dumps(options)}",
             f"prompt: {prompt.get('note', 'n/a')}"]
    for name, bench in metrics.get("benchmarks", {}).items():
        lines += ["", format_table(name, bench)]
    tradeoff = format_tradeoff(metrics)
    if tradeoff:
        lines += [""] + tradeoff
    helpfulness = format_helpfulness(metrics, base_metrics)
    if helpfulness:
        lines += [""] + helpfulness
    lines += ["", "wall time: " + ", ".join(f"{stage} {'skipped (on disk)' if seconds is None else f'{seconds:.0f} s'}"
                                           for stage, seconds in timings.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Distil, evaluate, print the table; return the exit code."""
    from actors.config import ConfigError
    from actors.runtime import quiet_libraries
    from pipelines.distill import DistillConfig, StageDirs, run_distill
    from pipelines.evaluate import EvalConfig, prompt_given, run_evaluation, with_adapter_prompt

    quiet_libraries(args.verbose)
    distill_config = load_config(DistillConfig, args.distill_config)
    adapter = StageDirs(distill_config.run_dir).adapter("sft")
    data, overrides = read_yaml(args.eval_config), [f"model.adapter={json.dumps(str(adapter))}"]
    eval_config = build_config(EvalConfig, data, overrides)  # checked before any training
    if eval_config.model.base != distill_config.model.base:
        raise ConfigError(f"the evaluation's model.base ({eval_config.model.base!r}) is not the distilled "
                          f"student ({distill_config.model.base!r})")
    timings: dict[str, float | None] = {}
    for stage in distill_config.stages:
        start = time.monotonic()
        summary = run_distill(distill_config, [stage], progress=not args.no_progress, verbose=args.verbose)[stage]
        timings[stage] = None if summary.get("skipped") else time.monotonic() - start
    # the same prompt rule as dabon evaluate: the recipe's prompt section, else the prompt.yaml
    # that the distillation just wrote beside the adapter
    eval_config = with_adapter_prompt(eval_config, prompt_given(data, overrides))
    start = time.monotonic()
    metrics = run_evaluation(eval_config, progress=not args.no_progress, verbose=args.verbose)
    timings["evaluate"] = time.monotonic() - start
    base_config, base_metrics = base_benign_config(data, eval_config), None
    if base_config is not None:
        start = time.monotonic()
        base_metrics = run_evaluation(base_config, progress=not args.no_progress, verbose=args.verbose)
        timings["evaluate base"] = time.monotonic() - start
    print(f"adapter: {adapter}\nreport:  {Path(eval_config.output.dir) / 'report.md'}\n")
    print(format_summary(metrics, timings, base_metrics))
    return 0


main = command_main("python -m pipelines.quickstart", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
