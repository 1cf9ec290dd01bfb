"""The ``dabon`` command.

    dabon quickstart
    dabon distill --config recipes/quickstart.yaml [--stages generate,filter,sft,grpo]
    dabon score --adapter DIR --input IN.jsonl --output OUT.jsonl --layers 6,12
    dabon evaluate --config recipes/quickstart-eval.yaml [--n 4 --layers 6,12 ...]
    dabon report RUN_DIR
    dabon budget --run RUN_DIR --budget 0.02 [--score latent_sim_6]   # the budgeted selector's threshold
    dabon sweep --config recipes/quickstart-sweep.yaml --run RUN   # ASR across training checkpoints
    dabon serve [--config serve_app/config.yaml] [--adapter DIR --n 4 --layer 12 --port 8000]
    dabon random-adapter --out runs/demo/adapter

``dabon <command> --help`` describes each command's options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from actors.models import EMBEDDED_ALIAS, write_random_adapter
from pipelines import budget, distill, evaluate, quickstart, report, score, serve, sweep
from pipelines.args import run_guarded


def _random_adapter(args: argparse.Namespace) -> int:
    path = write_random_adapter(args.base, args.out, rank=args.rank, std=args.std, seed=args.seed)
    print(f"wrote a random (untrained) LoRA adapter for {args.base} to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dabon`` argument parser with one sub-command per pipeline."""
    parser = argparse.ArgumentParser(
        prog="dabon",
        description="Deliberative alignment + latent-attribution Best-of-N: distil, evaluate and serve on Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score_parser = commands.add_parser(
        "score", help="latent-attribution scores for given responses (JSONL in, JSONL out)",
        description=score.__doc__.split("\n\n")[0],
    )
    score.add_arguments(score_parser)
    score_parser.set_defaults(run=score.run)

    quickstart_parser = commands.add_parser(
        "quickstart", help="distil SmolLM2 (CPU recipe), evaluate it with Best-of-N, print the ASR table",
        description=quickstart.__doc__.split("\n\n")[0],
    )
    quickstart.add_arguments(quickstart_parser)
    quickstart_parser.set_defaults(run=quickstart.run)

    distill_parser = commands.add_parser(
        "distill", help="teacher traces -> judge filter -> LoRA SFT (Ray Train) -> optional GRPO",
        description=distill.__doc__.split("\n\n")[0],
    )
    distill.add_arguments(distill_parser)
    distill_parser.set_defaults(run=distill.run)

    evaluate_parser = commands.add_parser(
        "evaluate", help="sample N answers per benchmark prompt, judge, score, and report (Ray Data)",
        description=evaluate.__doc__.split("\n\n")[0],
    )
    evaluate.add_arguments(evaluate_parser)
    evaluate_parser.set_defaults(run=evaluate.run)

    report_parser = commands.add_parser(
        "report", help="rebuild metrics.json, report.md and plots from a run's stored shards",
        description=report.__doc__.split("\n\n")[0],
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(run=report.run)

    budget_parser = commands.add_parser(
        "budget", help="choose the budgeted selector's threshold: lowest ASR within an over-refusal budget over random",
        description=budget.__doc__.split("\n\n")[0],
    )
    budget.add_arguments(budget_parser)
    budget_parser.set_defaults(run=budget.run)

    sweep_parser = commands.add_parser(
        "sweep", help="evaluate a student across training checkpoints: ASR per checkpoint, as a table and a plot",
        description=sweep.__doc__.split("\n\n")[0],
    )
    sweep.add_arguments(sweep_parser)
    sweep_parser.set_defaults(run=sweep.run)

    serve_parser = commands.add_parser(
        "serve", help="serve the latent-attribution Best-of-N reranker (Ray Serve, OpenAI-compatible API)",
        description=serve.__doc__.split("\n\n")[0],
    )
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.run)

    adapter_parser = commands.add_parser(
        "random-adapter",
        help="write a random, untrained LoRA adapter (to try scoring before you have a distilled one)",
        description="Write a LoRA adapter with random nonzero weights for a base model. It is not trained: "
        "its scores say nothing about safety; use it to exercise scoring and serving.",
    )
    adapter_parser.add_argument("--base", default=EMBEDDED_ALIAS, help=f"base model (default: {EMBEDDED_ALIAS})")
    adapter_parser.add_argument("--out", required=True, type=Path, help="directory to write the adapter to")
    adapter_parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    adapter_parser.add_argument("--std", type=float, default=0.02, help="std of the random lora_B weights (default 0.02)")
    adapter_parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    adapter_parser.set_defaults(run=_random_adapter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dabon`` console script."""
    args = build_parser().parse_args(argv)
    return run_guarded(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
