"""``dabon quickstart``: distil SmolLM2, evaluate it with Best-of-N, print the ASR table.

Launch (from the repository root; about 25 minutes of SFT and 10 of evaluation on 2 cores)::

    dabon quickstart
    dabon quickstart --distill-config recipes/quickstart.yaml --eval-config recipes/quickstart-eval.yaml

Runs ``recipes/quickstart.yaml`` (replayed STAR-1 traces on the train split -> keyword filter ->
LoRA SFT on a local Ray), then ``recipes/quickstart-eval.yaml`` on the STAR-1 *dev* split with the
adapter it wrote (N samples, judge, attribution scores, report). Both stages skip what is already
on disk, so a rerun after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actors.config import load_config
from pipelines.args import add_output_arguments, command_main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon quickstart`` options."""
    parser.add_argument("--distill-config", type=Path, default=RECIPES / "quickstart.yaml",
                        help="distillation recipe (default recipes/quickstart.yaml)")
    parser.add_argument("--eval-config", type=Path, default=RECIPES / "quickstart-eval.yaml",
                        help="evaluation recipe (default recipes/quickstart-eval.yaml); its adapter is replaced "
                        "by the one the distillation writes")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Distil, evaluate, print the ASR table; return the exit code."""
    from actors.config import ConfigError
    from actors.runtime import quiet_libraries
    from pipelines.distill import DistillConfig, StageDirs, run_distill
    from pipelines.evaluate import EvalConfig, run_evaluation

    quiet_libraries(args.verbose)
    distill_config = load_config(DistillConfig, args.distill_config)
    run_distill(distill_config, progress=not args.no_progress, verbose=args.verbose)
    adapter = StageDirs(distill_config.run_dir).adapter("sft")
    eval_config = load_config(EvalConfig, args.eval_config, [f"model.adapter={json.dumps(str(adapter))}"])
    if eval_config.model.base != distill_config.model.base:
        raise ConfigError(f"the evaluation's model.base ({eval_config.model.base!r}) is not the distilled "
                          f"student ({distill_config.model.base!r})")
    metrics = run_evaluation(eval_config, progress=not args.no_progress, verbose=args.verbose)
    run_dir = Path(eval_config.output.dir)
    print(f"adapter: {adapter}\nreport:  {run_dir / 'report.md'}")
    for name, bench in metrics.get("benchmarks", {}).items():
        print(f"\n{name}: attack success rate over {bench.get('n_prompts')} prompts, N={bench.get('n_samples')}")
        for selector, value in bench.get("asr", {}).items():
            interval = bench.get("asr_ci", {}).get(selector)
            shown = f"{value:6.1%}" if value is not None else "   n/a"
            extra = f"  [{interval[0]:.1%}, {interval[1]:.1%}]" if interval else ""
            print(f"  {selector:<20} {shown}{extra}")
    return 0


main = command_main("python -m pipelines.quickstart", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
