"""``dabon sweep``: evaluate a student across training, one evaluation per checkpoint, one table.

Launch::

    dabon sweep --config recipes/quickstart-sweep.yaml --run runs/qs-sweep-train --with-base --out runs/qs-sweep
    dabon sweep --config recipes/quickstart-eval.yaml --adapters runs/a/adapter,runs/b/adapter --out runs/ab
    python -m pipelines.sweep ...                          # the same flags (what `ray job submit` runs)

The adapters are ``--adapters`` (a comma list of adapter directories or storage URIs), or the
checkpoints a distillation run exported (``--run RUN``: ``RUN/checkpoints/index.json``, written
when ``sft.checkpoints_to_keep`` keeps several, e.g. with ``sft.save_steps``; else
``RUN/adapter``); ``--with-base`` adds the base model alone (no scoring: single and random only),
prompted as the students are (the recipe's prompt section, else the students' own ``prompt.yaml``:
the same system prompt and response prefix under its own chat template; ``--base-prompt
template`` for the template's default and no prefix), so that every model answers the same
prompts; each table states the response prefix of every row.
Each is evaluated with the recipe (``--config`` and ``--set``, ``model.adapter`` replaced; the
adapter's own ``prompt.yaml`` when the recipe gives no prompt) into ``OUT/<label>/``, as ``dabon
evaluate`` would (a rerun skips finished shards), on one local Ray.

Then ``OUT/sweep.json``, ``OUT/sweep.md`` and ``OUT/sweep.png``: per checkpoint and harmful
benchmark, the ASR of single sampling, a seeded random pick, latent-similarity Best-of-N at the
calibrated layer (chosen on the recipe's calibration set) and the majority-unsafe oracle, all on
the same prompts (every judged harmful prompt), beside single and latent BoN on the prompts
outside the calibration set (the test pair), with 95% bootstrap intervals, under both policies for unfinished
reasoning when the report has them (``unfinished = judge's verdict`` / ``unfinished = unsafe``);
the share of unfinished single samples; and the utility of single sampling (GSM8K exact match,
MMLU accuracy, benign answer rate). Where single and random ASR sit between 0 and 1 and the
oracle is above them, the student is uncertain: that is where Best-of-N can help.

When the recipe has a benign benchmark, the table opens with both axes side by side: ASR
(single, random, latent BoN; unfinished reasoning counted unsafe) and the benign answer rate
(the same selectors), the base model beside the checkpoints, and the checkpoint that the rule
``--min-benign-ratio R`` chooses: the lowest single-sample ASR among the checkpoints that answer
at least R x as many benign prompts as the base model (``choose_checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from actors import storage
from actors.config import ConfigError, PromptConfig, read_yaml
from actors.errors import UserError
from actors.scores import get_score
from actors.settings import get_logger
from pipelines.args import add_config_arguments, add_output_arguments, command_main

logger = get_logger(__name__)

SELECTORS = ("single", "random", "latent", "oracle_majority")
LABELS = {"single": "single", "random": "random", "latent": "latent BoN", "oracle_majority": "oracle"}


BASE_PROMPTS = ("students", "template")


def base_prompt(student_prompts: Sequence[PromptConfig], given: PromptConfig | None, mode: str = "students"
                ) -> tuple[PromptConfig, str]:
    """The prompt the base model is evaluated with (``--with-base``), and where it came from.

    ``mode`` ``students`` (the default): the recipe's prompt section ``given`` when it has one
    (as for every student), else the prompt the students were evaluated with (their adapters'
    ``prompt.yaml``; they must agree): the same system prompt and response prefix under the
    base's own chat template, so that base and students answer the same prompts. ``template``:
    the chat template's default, no system prompt and no prefix."""
    if mode not in BASE_PROMPTS:
        raise ConfigError(f"--base-prompt: expected one of {', '.join(BASE_PROMPTS)}, got {mode!r}")
    if mode == "template":
        return PromptConfig(), "the chat template's default (no system prompt, no response prefix), as --base-prompt template asks"
    if given is not None:
        return given, "the recipe's prompt section, as every student"
    distinct = list(dict.fromkeys(prompt.model_dump_json() for prompt in student_prompts))
    if not distinct:
        raise ConfigError("--with-base: no student to take the prompt from")
    if len(distinct) > 1:
        raise ConfigError("--with-base: the students were trained with different prompts "
                          f"({'; '.join(distinct)}); give the recipe a prompt section (or --set prompt.response_prefix=...) "
                          "so that every model answers the same prompts, or use --base-prompt template")
    return student_prompts[0], "the students' prompt (their prompt.yaml), under the base model's own chat template"


def checkpoints_of(run: str) -> list[dict[str, Any]]:
    """``[{"label", "adapter", "step", "epoch"}]`` of a distillation run directory: its exported
    checkpoints (``checkpoints/index.json``), else its final ``adapter/``."""
    from pipelines.stages import ADAPTER_DIR, CHECKPOINTS_DIR

    index = storage.join(run, CHECKPOINTS_DIR, "index.json")
    if storage.is_file(index):
        entries = storage.read_json(index).get("checkpoints") or []
        if entries:
            return [{"label": f"step-{int(e['step']):05d}", "adapter": e["adapter"], "step": int(e["step"]),
                     "epoch": e.get("epoch")} for e in entries]
    adapter = storage.join(run, ADAPTER_DIR)
    if storage.is_file(storage.join(adapter, "adapter_config.json")):
        training = storage.join(adapter, "training.json")
        state = storage.read_json(training) if storage.is_file(training) else {}
        return [{"label": "final", "adapter": adapter, "step": state.get("global_step"), "epoch": state.get("epoch")}]
    raise UserError(f"--run {run}: no {CHECKPOINTS_DIR}/index.json and no {ADAPTER_DIR}/ with an adapter; "
                    "is it a dabon distill run directory?")


def adapters_of(text: str) -> list[dict[str, Any]]:
    """``--adapters a,b`` -> entries labelled by each directory's name (made unique)."""
    entries, seen = [], set()
    for position, adapter in enumerate(part.strip() for part in text.split(",") if part.strip()):
        label = storage.basename(adapter.rstrip("/")) or f"adapter-{position}"
        if label in seen:
            label = f"{label}-{position}"
        seen.add(label)
        training = storage.join(adapter, "training.json")
        state = storage.read_json(training) if storage.is_file(training) else {}
        entries.append({"label": label, "adapter": adapter, "step": state.get("global_step"), "epoch": state.get("epoch")})
    if not entries:
        raise ConfigError("--adapters: expected a comma-separated list of adapter directories")
    return entries


def _asr_cell(bench: dict[str, Any], key: str, selector: str) -> dict[str, Any]:
    return {"value": (bench.get(key) or {}).get(selector), "ci": (bench.get(f"{key}_ci") or {}).get(selector)}


def row_of(entry: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The sweep's numbers of one checkpoint (see the module doc), per benchmark.

    Each comparison comes from one prompt set: ``judge`` / ``unsafe`` (the two unfinished
    policies) hold ``single``, ``random``, ``oracle_majority`` and ``latent`` (latent BoN at the
    calibrated layer) on all the benchmark's judged harmful prompts, ``latent_by_layer`` the
    same at every scored layer, and ``single_test`` / ``latent_test`` the calibrated layer's
    pair on the prompts outside the calibration set (``test_prompts``)."""
    from actors.scorer import latent_column

    benchmarks: dict[str, Any] = {}
    for name, bench in metrics.get("benchmarks", {}).items():
        out: dict[str, Any] = {"prompts": bench.get("asr_prompts", 0), "samples": bench.get("n_samples")}
        if bench.get("asr"):
            calibrated = bench.get("calibrated_layer") or {}
            layer = calibrated.get("layer")
            scored = [int(column.rsplit("_", 1)[1]) for column in bench["asr"]
                      if column.startswith("latent_sim_") and column.rsplit("_", 1)[1].isdigit()]
            for policy, key in (("judge", "asr"), ("unsafe", "asr_unfinished_unsafe")):
                if key not in bench:
                    continue
                out[policy] = {selector: _asr_cell(bench, key, selector) for selector in ("single", "random", "oracle_majority")}
                out[policy]["latent_by_layer"] = {str(other): _asr_cell(bench, key, latent_column(other)) for other in scored}
                if layer in scored:
                    out[policy]["latent"] = _asr_cell(bench, key, latent_column(layer))
                test_key = "asr_test" if policy == "judge" else "asr_test_unfinished_unsafe"
                if calibrated.get(test_key):
                    out[policy]["single_test"] = _asr_cell(calibrated, test_key, "single")
                    out[policy]["latent_test"] = _asr_cell(calibrated, test_key, "latent_sim")
            out["calibrated_layer"] = calibrated.get("layer")
            out["calibration"] = calibrated.get("source")
            out["test_prompts"] = calibrated.get("test_prompts")
            shares = (bench.get("pick_shares") or {}).get("single")
            if shares:
                out["single_unfinished"] = shares.get("unfinished")
                out["single_truncated"] = shares.get("truncated")
        for kind, utility in (bench.get("utility") or {}).items():
            if "value" in utility:
                values, intervals = utility["value"], utility.get("value_ci") or {}
                out.setdefault("utility", {})[kind] = {
                    "metric": utility["metric"], "prompts": utility.get("prompts"), "value": values.get("single"),
                    "ci": intervals.get("single"),
                    "selectors": {selector: {"value": value, "ci": intervals.get(selector)}
                                  for selector, value in values.items()}}
        benchmarks[name] = out
    prompt = metrics.get("prompt") or {}
    return {**entry, "response_prefix": prompt.get("response_prefix"), "benchmarks": benchmarks}


def _benign_rates(row: dict[str, Any], benign: str) -> dict[str, Any] | None:
    return ((row["benchmarks"].get(benign) or {}).get("utility") or {}).get("benign")


def safety_and_helpfulness(rows: Sequence[dict[str, Any]], harmful: str, benign: str, policy: str = "unsafe",
                           latent_layer: int | None = None) -> list[dict[str, Any]]:
    """The sweep's two axes per checkpoint: ASR on the ``harmful`` benchmark and the benign answer
    rate on the ``benign`` benchmark, each for single, random and latent BoN at ``latent_layer``
    (default each checkpoint's calibrated layer), each ``{"value", "ci"}`` or ``None``. Every ASR
    of a row is on the same prompts (all judged harmful prompts; ``policy``: ``unsafe`` counts
    unfinished reasoning unsafe, ``judge`` takes the judge's verdict), every answer rate on all
    benign prompts; ``response_prefix`` is the prefix the row was evaluated with."""
    table = []
    for row in rows:
        bench = row["benchmarks"].get(harmful) or {}
        cells = bench.get(policy) or bench.get("judge") or {}
        layer = latent_layer if latent_layer is not None else bench.get("calibrated_layer")
        latent = cells.get("latent") if latent_layer is None else (cells.get("latent_by_layer") or {}).get(str(layer))
        rates = (_benign_rates(row, benign) or {}).get("selectors") or {}
        table.append({
            "label": row["label"], "step": row.get("step"), "adapter": row.get("adapter"), "layer": layer,
            "response_prefix": row.get("response_prefix"),
            "asr": {"single": cells.get("single"), "random": cells.get("random"), "latent": latent},
            "benign": {"single": rates.get("single"), "random": rates.get("random"),
                       "latent": rates.get(get_score("latent_sim").column(layer)) if layer is not None else None},
        })
    return table


def choose_checkpoint(table: Sequence[dict[str, Any]], min_benign_ratio: float) -> dict[str, Any]:
    """The rule that picks the checkpoint to train to, on development prompts: among the students
    (every row but ``base``) whose single-sample benign answer rate is at least
    ``min_benign_ratio`` x the base model's, the one with the lowest single-sample ASR (ties: the
    higher benign answer rate, then the earlier step). Returns ``{"chosen": label or None,
    "bound": the answer rate a student needs, "eligible": [labels], "reason": str}``."""
    base = next((row for row in table if row["label"] == "base"), None)
    base_rate = ((base or {}).get("benign") or {}).get("single") or {}
    if base_rate.get("value") is None:
        return {"chosen": None, "bound": None, "eligible": [],
                "reason": "no benign answer rate of the base model (run the sweep with --with-base and a benign benchmark)"}
    bound = min_benign_ratio * base_rate["value"]
    eligible = []
    for row in table:
        rate, asr = (row["benign"].get("single") or {}).get("value"), (row["asr"].get("single") or {}).get("value")
        if row["label"] != "base" and rate is not None and asr is not None and rate >= bound - 1e-12:
            eligible.append(row)
    if not eligible:
        return {"chosen": None, "bound": bound, "eligible": [],
                "reason": f"no checkpoint answers at least {min_benign_ratio:g} x the base's benign answer rate ({bound:.1%})"}
    best = min(eligible, key=lambda row: (row["asr"]["single"]["value"], -row["benign"]["single"]["value"],
                                          row.get("step") if row.get("step") is not None else 0))
    return {"chosen": best["label"], "bound": bound, "eligible": [row["label"] for row in eligible],
            "reason": (f"lowest single-sample ASR ({best['asr']['single']['value']:.1%}) among the checkpoints whose "
                       f"benign answer rate is >= {min_benign_ratio:g} x the base's ({bound:.1%})")}


def pick_benchmarks(rows: Sequence[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(the harmful benchmark, the benign benchmark) of the sweep's two-axis table: the first, by
    name, with ASR, and the first with a benign answer rate."""
    names = sorted({name for row in rows for name in row["benchmarks"]})
    harmful = next((n for n in names if any("judge" in row["benchmarks"].get(n, {}) for row in rows)), None)
    benign = next((n for n in names if any(_benign_rates(row, n) for row in rows)), None)
    return harmful, benign


def _cell(result: dict[str, Any] | None) -> str:
    if not result or result.get("value") is None:
        return "n/a"
    interval = result.get("ci")
    shown = f"{result['value']:.1%}"
    return f"{shown} [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else shown


def _prefix(row: dict[str, Any]) -> str:
    prefix = row.get("response_prefix")
    return "not recorded" if prefix is None else f"`{prefix!r}`"


def render_two_axes(table: Sequence[dict[str, Any]], harmful: str, benign: str, choice: dict[str, Any] | None,
                    min_benign_ratio: float | None) -> list[str]:
    """The Markdown lines of the safety-and-helpfulness table and the rule's choice."""
    lines = [f"## Safety and helpfulness: {harmful} ASR (unfinished reasoning = unsafe) and benign answer rate on {benign}", "",
             "| checkpoint | step | ASR single | ASR random | ASR latent BoN | answered single | answered random | "
             "answered latent BoN | layer | response prefix |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['label']} | {'' if row.get('step') is None else row['step']} | "
                     + " | ".join(_cell(row[axis].get(selector)) for axis in ("asr", "benign")
                                  for selector in ("single", "random", "latent"))
                     + f" | {'' if row.get('layer') is None else row['layer']} | {_prefix(row)} |")
    lines += ["", f"Every ASR of a row is on all judged harmful prompts of {harmful} (latent BoN at the layer shown, "
              f"chosen on the calibration prompts), every answer rate on all benign prompts of {benign}; each model "
              "answered with its own chat template and the response prefix shown.", ""]
    if choice is not None:
        lines += [f"Rule (--min-benign-ratio {min_benign_ratio:g}): {choice['reason']}.",
                  f"Chosen: **{choice['chosen']}**." if choice["chosen"] else "Chosen: none.", ""]
    return lines


def render(rows: Sequence[dict[str, Any]], recipe: str, min_benign_ratio: float | None = None) -> str:
    """``sweep.md``: the two-axis table (ASR and benign answer rate, with the checkpoint the rule
    chooses) when the recipe has a benign benchmark, one table per harmful benchmark and policy,
    one for utility."""
    lines = ["# ASR across training", "", f"Recipe: `{recipe}`; one evaluation per checkpoint (see each `OUT/<label>/report.md`).",
             "Each comparison is on one prompt set: `single`, `random`, `latent BoN` (latent-similarity argmin at the "
             "calibrated layer, chosen on the calibration prompts) and `oracle` on all judged harmful prompts; `single "
             "on test` and `latent on test` on the prompts outside the calibration set only (when the calibration set "
             "is part of the benchmark, `latent BoN` includes the prompts its layer was chosen on; the test pair does "
             "not). Intervals: 95% bootstrap over prompts.", ""]
    harmful, benign = pick_benchmarks(rows)
    if harmful and benign:
        table = safety_and_helpfulness(rows, harmful, benign)
        choice = choose_checkpoint(table, min_benign_ratio) if min_benign_ratio is not None else None
        lines += render_two_axes(table, harmful, benign, choice, min_benign_ratio)
    names = sorted({name for row in rows for name in row["benchmarks"]})
    for name in names:
        for policy, title in (("judge", "unfinished reasoning = the judge's verdict"), ("unsafe", "unfinished reasoning = unsafe")):
            table = [row for row in rows if policy in row["benchmarks"].get(name, {})]
            if not table:
                continue
            lines += [f"## {name}: {title}", "",
                      "| checkpoint | step | prompts | single | random | latent BoN (layer) | oracle | test prompts | "
                      "single on test | latent on test | unfinished single | response prefix |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for row in table:
                bench = row["benchmarks"][name]
                cells = bench[policy]
                latent = cells.get("latent")
                layer = bench.get("calibrated_layer")
                unfinished = bench.get("single_unfinished")
                tested = "latent_test" in cells
                lines.append(
                    f"| {row['label']} | {row.get('step') if row.get('step') is not None else ''} | {bench.get('prompts')} | "
                    f"{_cell(cells.get('single'))} | {_cell(cells.get('random'))} | "
                    f"{_cell(latent)}{f' (L{layer})' if latent and layer is not None else ''} | "
                    f"{_cell(cells.get('oracle_majority'))} | {bench.get('test_prompts') if tested else ''} | "
                    f"{_cell(cells.get('single_test')) if tested else ''} | {_cell(cells.get('latent_test')) if tested else ''} | "
                    f"{'' if unfinished is None else format(unfinished, '.0%')} | {_prefix(row)} |")
            lines.append("")
    utility_rows = [(row, name, kind, value) for row in rows for name in names
                    for kind, value in (row["benchmarks"].get(name, {}).get("utility") or {}).items()]
    if utility_rows:
        lines += ["## Utility (single sampling)", "", "| checkpoint | step | benchmark | metric | value |", "|---|---|---|---|---|"]
        for row, name, kind, value in utility_rows:
            lines.append(f"| {row['label']} | {row.get('step') if row.get('step') is not None else ''} | {name} ({kind}) | "
                         f"{value['metric']} | {_cell(value)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], out: str) -> str | None:
    """``sweep.png``: ASR (judge's verdict policy) against the checkpoint, one panel per harmful benchmark."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted({name for row in rows for name, bench in row["benchmarks"].items() if "judge" in bench})
    if not names:
        return None
    figure = Figure(figsize=(5.0 * len(names), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    positions = list(range(len(rows)))
    for panel, name in enumerate(names, start=1):
        axis = figure.add_subplot(1, len(names), panel)
        for offset, selector in enumerate(SELECTORS):
            xs, ys, low, high = [], [], [], []
            for position, row in zip(positions, rows):
                cell = row["benchmarks"].get(name, {}).get("judge", {}).get(selector)
                if not cell or cell.get("value") is None:
                    continue
                xs.append(position + (offset - 1.5) * 0.06)
                ys.append(cell["value"])
                interval = cell.get("ci") or [cell["value"], cell["value"]]
                low.append(cell["value"] - interval[0])
                high.append(interval[1] - cell["value"])
            if xs:
                axis.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=LABELS[selector])
        axis.set_xticks(positions)
        axis.set_xticklabels([row["label"] for row in rows], rotation=30, ha="right")
        axis.set_ylabel("attack success rate")
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(name)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    location = storage.join(out, "sweep.png")
    storage.write_bytes(location, buffer.getvalue())
    return location


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon sweep`` options."""
    add_config_arguments(parser, "recipes/quickstart-sweep.yaml", "sampling.n=4")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", dest="run_dir", metavar="RUN",
                        help="a dabon distill run directory: evaluate its exported checkpoints")
    source.add_argument("--adapters", help="comma-separated adapter directories (or storage URIs) to evaluate")
    parser.add_argument("--with-base", action="store_true", help="also evaluate the base model alone (single and random only)")
    parser.add_argument("--base-prompt", choices=BASE_PROMPTS, default="students",
                        help="the base model's prompt with --with-base: 'students' (default) the recipe's prompt, else the "
                        "students' own (system prompt and response prefix, e.g. '<think>\\n'), so every model answers the "
                        "same prompts; 'template' the chat template's default, no prefix")
    parser.add_argument("--min-benign-ratio", type=float, default=0.5, metavar="R",
                        help="choose the checkpoint with the lowest single-sample ASR among those whose benign answer "
                        "rate is >= R x the base model's (needs --with-base and a benign benchmark; default 0.5)")
    parser.add_argument("--out", help="output directory (default: the recipe's output.dir + '-sweep')")
    parser.add_argument("--ray-address", help="connect to this Ray cluster (e.g. auto) instead of starting one")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``dabon sweep``: evaluate every checkpoint, then write and print the table."""
    import ray

    from actors.config import build_config
    from actors.runtime import init_ray, quiet_libraries
    from pipelines.evaluate import EvalConfig, prompt_given, run_evaluation, with_adapter_prompt

    quiet_libraries(args.verbose)
    if args.config is None:
        raise ConfigError("--config: the sweep needs an evaluation recipe (e.g. recipes/quickstart-sweep.yaml)")
    data = read_yaml(args.config)
    entries = checkpoints_of(args.run_dir) if args.run_dir else adapters_of(args.adapters)
    base_config = build_config(EvalConfig, data, args.overrides)
    out = args.out or (base_config.output.dir.rstrip("/") + "-sweep")
    given = prompt_given(data, args.overrides)

    def config_of(entry: dict[str, Any]) -> EvalConfig:
        overrides = list(args.overrides) + [f"model.adapter={json.dumps(entry['adapter'])}",
                                            f"output.dir={json.dumps(storage.join(out, entry['label']))}"]
        if args.ray_address:
            overrides.append(f"ray.address={json.dumps(args.ray_address)}")
        return with_adapter_prompt(build_config(EvalConfig, data, overrides), given)

    configs = [config_of(entry) for entry in entries]
    if args.with_base:
        base = {"label": "base", "adapter": None, "step": 0, "epoch": 0}
        prompt, source = base_prompt([config.prompt for config in configs], base_config.prompt if given else None,
                                     args.base_prompt)
        logger.info("sweep: the base model's prompt: %s (response prefix %r)", source, prompt.response_prefix)
        entries, configs = [base, *entries], [config_of(base).model_copy(update={"prompt": prompt}), *configs]
    logger.info("sweep: %d evaluations into %s: %s", len(configs), out, ", ".join(e["label"] for e in entries))
    started = init_ray(configs[0].ray, log_to_driver=args.verbose, verbose=args.verbose)
    rows = []
    try:
        for entry, config in zip(entries, configs):
            logger.info("sweep: evaluating %s (%s)", entry["label"], entry["adapter"] or "the base model alone")
            metrics = run_evaluation(config, progress=not args.no_progress, verbose=args.verbose)
            rows.append(row_of(entry, metrics))
    finally:
        if started:
            ray.shutdown()
    if not 0 <= args.min_benign_ratio <= 1:
        raise ConfigError(f"--min-benign-ratio: expected a number in [0, 1], got {args.min_benign_ratio}")
    harmful, benign = pick_benchmarks(rows)
    summary: dict[str, Any] = {"recipe": str(args.config), "checkpoints": rows}
    if harmful and benign:
        table = safety_and_helpfulness(rows, harmful, benign)
        summary["two_axes"] = {"harmful": harmful, "benign": benign, "table": table,
                               "choice": {**choose_checkpoint(table, args.min_benign_ratio),
                                          "min_benign_ratio": args.min_benign_ratio}}
    storage.write_json(storage.join(out, "sweep.json"), summary)
    text = render(rows, str(args.config), args.min_benign_ratio)
    storage.write_text(storage.join(out, "sweep.md"), text)
    figure = plot(rows, out)
    print(text)
    print(f"table: {storage.join(out, 'sweep.md')}" + (f"  plot: {figure}" if figure else ""))
    return 0


main = command_main("python -m pipelines.sweep", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
