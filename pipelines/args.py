"""Command-line plumbing every pipeline shares: common flags, list parsing, the error guard.

Each pipeline module defines ``add_arguments(parser)`` and ``run(args)`` and ends with
``main = command_main(...)``, so ``python -m pipelines.<name>`` (what ``ray job submit`` runs)
and ``dabon <name>`` take the same flags and treat errors the same way: a ``UserError`` (bad
config, missing file, model not found) prints one line and exits 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from actors.config import ConfigError, set_path
from actors.errors import user_error_of

Runner = Callable[[argparse.Namespace], int]


def parse_int_list(text: str, option: str) -> list[int]:
    """``"6,12"`` -> ``[6, 12]``; a ``ConfigError`` names the option otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers such as 6,12, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option}: expected at least one integer")
    return values


def add_config_arguments(parser: argparse.ArgumentParser, example_recipe: str, example_override: str) -> None:
    """``--config`` (a YAML recipe) and repeatable ``--set key.path=value`` overrides."""
    parser.add_argument("--config", type=Path, help=f"YAML recipe (e.g. {example_recipe}); defaults apply without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any config key with a dotted path, e.g. --set {example_override} (repeatable)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` and ``--verbose``."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and the ML libraries' logs and warnings (hidden by default)")


def set_flags(data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``flags`` whose value is not ``None`` in the recipe mapping ``data``
    (command-line flags are typed values, not YAML text); returns ``data``."""
    for key, value in flags.items():
        if value is not None:
            set_path(data, key.split("."), value)
    return data


def run_guarded(run: Runner, args: argparse.Namespace) -> int:
    """Run a command; a ``UserError`` (also one raised in a Ray worker) prints one line and
    returns 2, anything else propagates with its traceback."""
    try:
        return run(args)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is the user's to fix
        user_error = user_error_of(err)
        if user_error is None:
            raise
        print(f"dabon: error: {user_error}", file=sys.stderr)
        return 2


def command_main(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Runner) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of ``python -m pipelines.<name>``: parse, then ``run_guarded``."""

    def main(argv: list[str] | None = None) -> int:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # before Ray Train starts (RAY_NOTES.md)
        parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
        add_arguments(parser)
        return run_guarded(run, parser.parse_args(argv))

    return main
