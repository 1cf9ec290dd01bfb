"""``dabon score``: latent-attribution scores for prompts with N given responses (JSONL in, JSONL out).

Launch::

    dabon score --base smollm2-135m-instruct --adapter runs/demo/adapter \\
        --input examples/score_input.jsonl --output out/scores.jsonl --layers 6,12
    python -m pipelines.score --base ... (same flags; what ``ray job submit`` would call)

Input rows: ``{"id": ..., "prompt": str, "responses": [str, ...]}``; optionally
``"response_ids": [[int, ...], ...]`` (exact generated token ids, used as they are instead of
tokenizing ``responses``) and ``"prompt_ids": [int, ...]`` (used instead of the chat template).

Output rows: ``{"id": ..., "latent_sim": {"<L>": [N floats]}, "kl": [...], "perplexity": [...],
"self_certainty": [...], "selected": {"<L>": argmin index}}`` (an empty response, no token id,
is selected only when all are); token metrics only when asked, ``null`` for an empty response.
Any registered score can be asked for (``--metrics``), a score of your own too (``--plugins
mypkg.mod:MyScore``, see ``actors.scores``); each is a key of the row (``{"<L>": [...]}`` when
per layer), and ``selected`` follows ``--rule`` (default ``latent_sim``); with ``--threshold T``
it follows the budgeted rule (``actors.selection.budgeted_choice``: the score decides where its
spread over the candidates is at least T, else the first non-empty response) and the row also
has ``"threshold"`` and ``"decided_by"`` (``"score"`` or ``"plain"``, per layer). Rows are written and flushed chunk by chunk: a malformed row
stops the run with an error naming its line and field after the rows before it are written,
and ``--resume`` continues an interrupted output without duplicating ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from actors.config import ConfigError, PromptConfig, validate
from actors.errors import UserError
from actors.models import EMBEDDED_ALIAS, ModelSpec
from actors.scorer import AttributionScorer, ScorerConfig, scores_row
from actors.scores import ScoreError, load_plugins, registered
from actors.selection import check_threshold, empty_flags
from actors.settings import get_logger
from pipelines.args import add_output_arguments, command_main, parse_int_list

logger = get_logger(__name__)


class InputError(UserError, ValueError):
    """A malformed input row: the message names the line and the field."""


def parse_metrics(text: str) -> list[str]:
    """``"latent_sim,kl"`` -> ``["latent_sim", "kl"]``, each checked against the registered scores
    (``actors.scores``; load plugins first)."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in registered()]
    if unknown or not values:
        raise ConfigError(f"--metrics: expected a comma-separated subset of {','.join(registered())}, got {text!r}")
    return values


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def validate_row(row: Any, line: int) -> dict[str, Any]:
    """Check one input row; raise ``InputError`` naming the line and the field."""
    where = f"line {line}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise InputError(f"{where}: field 'id' is missing")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise InputError(f"{where}: field 'id' must be a string or an integer")
    if "prompt_ids" in row:
        if not _is_int_list(row["prompt_ids"]) or not row["prompt_ids"]:
            raise InputError(f"{where}: field 'prompt_ids' must be a non-empty list of integers")
    elif not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise InputError(f"{where}: field 'prompt' must be a non-empty string")
    if "response_ids" in row:
        ids = row["response_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int_list(r) for r in ids):
            raise InputError(f"{where}: field 'response_ids' must be a non-empty list of lists of integers")
        if "responses" in row and (not isinstance(row["responses"], list) or len(row["responses"]) != len(ids)):
            raise InputError(f"{where}: fields 'responses' and 'response_ids' must have the same length")
    else:
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses:
            raise InputError(f"{where}: field 'responses' must be a non-empty list of strings")
        for index, response in enumerate(responses):
            if not isinstance(response, str):
                raise InputError(f"{where}: field 'responses[{index}]' must be a string, got {type(response).__name__}")
    return row


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | InputError]]:
    """Yield (line number, validated row or the error for that line); blank lines are skipped."""
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, validate_row(json.loads(text), number)
            except json.JSONDecodeError as err:
                yield number, InputError(f"line {number}: not valid JSON ({err.msg} at column {err.colno})")
            except InputError as err:
                yield number, err


def completed_ids(output: Path) -> set[Any]:
    """Ids already in ``output``; a torn last line (a crash mid-write) is cut off."""
    done: set[Any] = set()
    if not output.exists():
        return done
    keep = 0
    with open(output, "rb") as handle:
        for raw in handle:
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not raw.endswith(b"\n"):
                break
            done.add(row["id"])
            keep += len(raw)
    if keep != output.stat().st_size:
        with open(output, "r+b") as handle:
            handle.truncate(keep)
    return done


def score_file(
    scorer: AttributionScorer,
    input_path: Path,
    output_path: Path,
    chunk_rows: int = 16,
    resume: bool = False,
    progress: bool = True,
    rule: str = "latent_sim",
    threshold: float | None = None,
) -> int:
    """Score ``input_path`` into ``output_path`` chunk by chunk; return the number of rows written.
    ``rule``: the registered score whose choice is the row's ``selected``; ``threshold``: the
    budgeted rule's (``scores_row``), ``None`` for the plain rule.

    A malformed row raises ``InputError`` after every valid row before it is written.
    """
    from tqdm import tqdm

    done = completed_ids(output_path) if resume else set()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(1 for text in open(input_path, encoding="utf-8") if text.strip())
    written = 0
    seen: set[Any] = set()
    layers = scorer.config.layers
    with open(output_path, "a" if resume else "w", encoding="utf-8") as out, tqdm(
        total=total, initial=0, unit="prompt", desc="scoring", disable=not progress
    ) as bar:
        chunk: list[dict[str, Any]] = []

        def flush() -> None:
            nonlocal written
            if not chunk:
                return
            prompts = [row["prompt_ids"] if "prompt_ids" in row else row["prompt"] for row in chunk]
            prompt_ids = [scorer.encode_prompt(p) for p in prompts]
            response_ids = [
                row["response_ids"] if "response_ids" in row else [scorer.encode_response(r) for r in row["responses"]]
                for row in chunk
            ]
            for row, ids, scores in zip(chunk, response_ids, scorer.score_ids(prompt_ids, response_ids)):
                out.write(json.dumps(scores_row(row["id"], scores, layers, empty=empty_flags(ids), rule=rule,
                                               threshold=threshold)) + "\n")
            out.flush()
            os.fsync(out.fileno())
            written += len(chunk)
            bar.update(len(chunk))
            chunk.clear()

        for number, row in read_rows(input_path):
            if isinstance(row, InputError):
                flush()
                raise row
            if row["id"] in seen:
                flush()
                raise InputError(f"line {number}: field 'id' {row['id']!r} repeats an earlier row")
            seen.add(row["id"])
            if row["id"] in done:
                bar.update(1)
                continue
            chunk.append(row)
            if len(chunk) >= chunk_rows:
                flush()
        flush()
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon score`` options."""
    parser.add_argument("--base", default=EMBEDDED_ALIAS, help=f"base model: alias, local dir, .gguf file or Hub id (default: {EMBEDDED_ALIAS})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="peft LoRA adapter directory on top of --base (the fine-tuned model)")
    source.add_argument("--finetuned", help="a separate full fine-tuned model (same forms as --base)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL with id, prompt, responses per line")
    parser.add_argument("--output", required=True, type=Path, help="JSONL to write, one row per input row")
    parser.add_argument("--layers", default="12",
                        help="hidden-state indices for latent similarity, e.g. 6,12 (0 = embeddings; default 12)")
    parser.add_argument("--metrics", default="latent_sim",
                        help="comma-separated registered scores: latent_sim, kl, perplexity, self_certainty, or a "
                             "plugin's (default latent_sim)")
    parser.add_argument("--plugins", default="",
                        help="comma-separated import paths of scores of your own, e.g. mypkg.probe:LinearProbeScore")
    parser.add_argument("--rule", default="latent_sim", help="the score whose choice is each row's 'selected' "
                        "(default latent_sim)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the budgeted rule: 'selected' is --rule's choice only where the spread (max - min) of "
                             "its scores over the non-empty responses is at least this (finite, >= 0), else the first "
                             "non-empty response; rows also get 'threshold' and 'decided_by' (default: none, the plain "
                             "rule; `dabon budget` chooses one)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="new tokens per forward batch (default 4096)")
    parser.add_argument("--response-prefix", default=None, help="text appended to the templated prompt, e.g. '<think>'")
    parser.add_argument("--system-prompt", default=None, help="system message (default: the chat template's own)")
    parser.add_argument("--chunk-rows", type=int, default=16, help="input rows scored (and written) together (default 16)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --output and score only the missing ids")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``dabon score`` with parsed arguments; return the process exit code."""
    from actors.runtime import quiet_libraries

    quiet_libraries(args.verbose)
    if not args.input.is_file():
        raise InputError(f"--input {args.input} does not exist")
    if args.batch_tokens <= 0 or args.chunk_rows <= 0:
        raise ConfigError("--batch-tokens and --chunk-rows must be positive")
    if args.output.exists() and args.output.stat().st_size and not (args.resume or args.overwrite):
        raise InputError(f"--output {args.output} exists; pass --resume to continue it or --overwrite to replace it")
    spec = validate(ModelSpec, {"base": args.base, "adapter": args.adapter, "finetuned": args.finetuned,
                                "dtype": args.dtype, "device": args.device}, "model")
    plugins = [part.strip() for part in args.plugins.split(",") if part.strip()]
    try:
        load_plugins(plugins)
    except ScoreError as err:
        raise ConfigError(f"--plugins: {err}") from None
    if args.rule not in registered():
        raise ConfigError(f"--rule: unknown {args.rule!r}; expected one of {', '.join(registered())}")
    if args.threshold is not None:
        try:
            check_threshold(args.threshold, "--threshold")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    config = validate(ScorerConfig, {"layers": parse_int_list(args.layers, "--layers"), "metrics": parse_metrics(args.metrics),
                                     "plugins": plugins, "batch_tokens": args.batch_tokens}, "scoring")
    prompt = validate(PromptConfig, {"system_prompt": args.system_prompt, "response_prefix": args.response_prefix or ""},
                      "prompt")
    scorer = AttributionScorer.from_spec(spec, config, prompt)
    written = score_file(scorer, args.input, args.output, args.chunk_rows, args.resume, progress=not args.no_progress,
                         rule=args.rule, threshold=args.threshold)
    logger.info("wrote %d rows to %s", written, args.output)
    return 0


main = command_main("python -m pipelines.score", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
