"""Deliberative-alignment distillation: teacher traces -> judge filter -> LoRA SFT -> (GRPO).

Launch::

    # local (a Ray started in-process): the CPU recipe, SmolLM2 student, STAR-1 replay teacher
    dabon distill --config recipes/quickstart.yaml
    python -m pipelines.distill --config recipes/quickstart.yaml --stages sft --set sft.num_epochs=1
    # on a running cluster (the driver runs there; the working dir is shipped)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.distill --config recipes/paper.yaml --ray-address auto

Stages (``--stages``, default the recipe's ``stages``), each reading the files of the one before,
so ``--stages sft`` alone works on an existing run directory (``output.dir``, default
``runs/<name>``)::

    config.yaml                    the resolved config of the latest invocation
    traces/<shard>.parquet         generate: finished teacher traces (prompt, categories, reasoning,
    traces/unfinished/...          answer, teacher, ...); unfinished ones apart; summary.json last
    filtered/{kept,rejected}.parquet + counts.json      filter: judge verdicts, counts per category
    sft/                           Ray Train storage of the SFT run (checkpoint per epoch)
    adapter/                       the final SFT LoRA adapter + config.yaml + training.json
    grpo/  grpo/adapter/           GRPO's Ray Train storage and its final adapter

1. **generate**: Ray Data over the data set's prompts (``question`` + ``category``). Each prompt
   is wrapped in the teacher template (``pipelines/teacher_prompt.txt``) with the policies of its
   categories (``pipelines/policies.yaml``; an unknown category is an error) and sampled through
   a sampler backend (``hf``, ``vllm``, ``openai``), or, with the ``replay`` teacher, answered by
   the trace already in the data (STAR-1's ``response``, DeepSeek-R1's), so the pipeline runs
   offline. A trace is kept when it finished (stop token, a closing ``</think>``, non-empty
   reasoning and answer). Shards already on disk are skipped on a rerun.
2. **filter**: any judge of ``actors.judge`` over (prompt, ``<think>`` reasoning ``</think>``
   answer); kept = judged safe.
3. **sft**: ``actors.trainer``: TRL ``SFTTrainer`` + LoRA inside a Ray Train ``TorchTrainer``;
   prompt = the student's own chat template + ``prompt.system_prompt`` + ``prompt.response_prefix``
   (the same ``actors.chat`` ids the evaluation sampler builds: set the evaluation's
   ``sampling.system_prompt`` / ``sampling.response_prefix`` to the same values), loss on the
   completion only. An interrupted run resumes from its latest epoch checkpoint.
4. **grpo** (optional): TRL ``GRPOTrainer`` from the SFT adapter (trainable), reward = the judge
   calls the completion safe.

A stage whose output is complete is skipped; ``--overwrite`` redoes the stages asked for. Each
stage records the config it ran with (``stage.json``) and the stage it read; running it again
with a different config, or on top of a redone earlier stage, is an error until ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import string
import sys
import uuid
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.judge import THINK_CLOSE, split_reasoning
from actors.models import EMBEDDED_ALIAS, ModelSpec
from actors.rows import to_plain
from actors.settings import get_logger
from actors.trainer import GRPOSettings, SFTSettings, trace_text
from pipelines.config import ConfigError, build_config, read_yaml, save_config
from pipelines.evaluate import init_ray as start_ray
from pipelines.evaluate import (
    JudgeConfig,
    JudgeResources,
    RayConfig,
    StageResources,
    assign_shards,
)

logger = get_logger(__name__)

STAGES: tuple[str, ...] = ("generate", "filter", "sft", "grpo")
Stage = Literal["generate", "filter", "sft", "grpo"]

CONFIG_FILE = "config.yaml"
STAGE_FILE = "stage.json"
TRACES_DIR = "traces"
FILTERED_DIR = "filtered"
SFT_DIR = "sft"
ADAPTER_DIR = "adapter"
GRPO_DIR = "grpo"

# The nine categories of METHOD.md section 1 (STAR-41K / STAR-1 names) and the policy actions.
CATEGORIES: tuple[str, ...] = (
    "Harassment / Hate / Discrimination",
    "Sexual / Adult",
    "Violence / Physical Harm",
    "Self-Harm",
    "Illicit / Criminal Behavior",
    "Misinformation / Disinformation",
    "Privacy / Personal Data",
    "Intellectual Property",
    "Benign",
)
POLICY_ACTIONS: dict[str, str] = {
    "refuse": "Refuse",
    "safe_complete": "Safe-complete",
    "redirect": "Redirect to resources",
    "comply": "Comply",
}
# Paper's teacher sampling (METHOD.md section 1).
TEACHER_SAMPLING: dict[str, Any] = {"n": 1, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 2048}


# ----------------------------------------------------------------------------------------
# Policies and the teacher prompt
# ----------------------------------------------------------------------------------------


class PolicyError(ValueError):
    """A category without a policy, or a malformed policy or template file."""


class PolicyRule(BaseModel):
    """One rule: the ``action`` it calls for (refuse, safe_complete, redirect, comply) and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["refuse", "safe_complete", "redirect", "comply"]
    text: str = Field(min_length=1)


class Policy(BaseModel):
    """A category's safety policy: its ``objective`` and numbered ``rules``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: str = Field(min_length=1)
    rules: list[PolicyRule] = Field(min_length=1)


class PolicySet(BaseModel):
    """The policies file: ``version`` and one ``Policy`` per category name."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    policies: dict[str, Policy] = Field(min_length=1)


def _package_text(name: str) -> str:
    return resources.files("pipelines").joinpath(name).read_text(encoding="utf-8")


def load_policies(path: str | Path | None = None) -> dict[str, Policy]:
    """Category name -> ``Policy`` from a YAML file (default: the packaged ``policies.yaml``)."""
    where = str(path) if path else "pipelines/policies.yaml (packaged)"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8") if path else _package_text("policies.yaml"))
    except (OSError, yaml.YAMLError) as err:
        raise PolicyError(f"policies file {where}: {err}") from err
    try:
        return dict(PolicySet.model_validate(data).policies)
    except ValueError as err:
        raise PolicyError(f"policies file {where}: {err}") from err


def policy_for(category: str, policies: dict[str, Policy]) -> tuple[str, Policy]:
    """(canonical name, policy) of a category; names match exactly, ignoring case and outer spaces.

    An unknown category raises ``PolicyError`` listing the known ones (never a fallback policy).
    """
    wanted = category.strip()
    if wanted in policies:
        return wanted, policies[wanted]
    for name, policy in policies.items():
        if name.lower() == wanted.lower():
            return name, policy
    raise PolicyError(f"no safety policy for category {category!r}; known categories: {', '.join(policies)}")


def render_policies(categories: Iterable[str], policies: dict[str, Policy]) -> str:
    """The policies of ``categories`` (each once, in order) as text for the teacher prompt."""
    blocks, seen = [], set()
    for category in categories:
        name, policy = policy_for(category, policies)
        if name in seen:
            continue
        seen.add(name)
        lines = [f"### Policy: {name}", f"Objective: {policy.objective.strip()}", "Rules:"]
        lines += [f"{i}. [{POLICY_ACTIONS[rule.action]}] {rule.text.strip()}" for i, rule in enumerate(policy.rules, 1)]
        blocks.append("\n".join(lines))
    if not blocks:
        raise PolicyError("a prompt without any category gets no policy; every prompt needs at least one category")
    return "\n\n".join(blocks)


def load_teacher_template(path: str | Path | None = None) -> string.Template:
    """The teacher prompt template (default: the packaged ``teacher_prompt.txt``); it must hold
    the placeholders ``${policies}`` and ``${prompt}``."""
    where = str(path) if path else "pipelines/teacher_prompt.txt (packaged)"
    try:
        text = Path(path).read_text(encoding="utf-8") if path else _package_text("teacher_prompt.txt")
    except OSError as err:
        raise PolicyError(f"teacher template {where}: {err}") from err
    template = string.Template(text)
    names = set(template.get_identifiers())
    if names != {"policies", "prompt"}:
        raise PolicyError(f"teacher template {where}: expected the placeholders ${{policies}} and ${{prompt}}, found {sorted(names)}")
    return template


def teacher_prompt(question: str, categories: Iterable[str], policies: dict[str, Policy], template: string.Template) -> str:
    """The teacher's user message: the template filled with the question and its categories' policies."""
    return template.substitute(policies=render_policies(categories, policies), prompt=question.strip())


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


class PromptConfig(BaseModel):
    """How the student sees a prompt at train and test time: its own chat template with
    ``system_prompt`` (``null``: the template's default), then ``response_prefix`` opening the
    reasoning. The evaluation's ``sampling.system_prompt`` / ``sampling.response_prefix`` must
    match."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = "You are a helpful assistant."
    response_prefix: str = "<think>\n"

    @field_validator("response_prefix")
    @classmethod
    def _opens_reasoning(cls, value: str) -> str:
        if not "<think>\n".startswith(value):
            raise ValueError(f"expected '<think>\\n', '<think>' or '' (a start of '<think>\\n'), got {value!r}")
        return value


class TeacherConfig(BaseModel):
    """The teacher. ``backend``: ``replay`` (the data set's own ``response`` traces, no model) or
    a sampler backend (``hf``, ``vllm``, ``openai``) with ``model`` and backend ``options``.
    ``sampling``: ``actors.sampler.SamplingConfig`` fields (paper: temperature 0.6, top-p 0.95,
    2048 new tokens). ``name``: recorded in every trace (default: the model, or ``replay:<data>``).
    ``policies`` / ``template``: files replacing the packaged ones. ``resources``: the sampler pool."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["replay", "hf", "vllm", "openai"] = "replay"
    name: str | None = None
    model: ModelSpec | None = None
    options: dict[str, Any] = {}
    sampling: dict[str, Any] = dict(TEACHER_SAMPLING)
    policies: str | None = None
    template: str | None = None
    resources: StageResources = StageResources()

    @model_validator(mode="after")
    def _model_fits_backend(self) -> TeacherConfig:
        from actors.sampler import SamplingConfig

        SamplingConfig(**self.sampling)
        if self.backend == "replay":
            if self.model is not None or self.options:
                raise ValueError("model/options: the replay teacher reads traces from the data; it takes no model")
        elif self.model is None:
            raise ValueError(f"model: the {self.backend} teacher needs a model (base: Hub id, local dir or served name)")
        return self


class FilterConfig(BaseModel):
    """The judge that filters traces (``keyword``, ``llama_guard``, ``openai``) and its actor pool."""

    model_config = ConfigDict(extra="forbid")

    judge: JudgeConfig = JudgeConfig()
    resources: JudgeResources = JudgeResources()


class GRPOStageConfig(GRPOSettings):
    """``GRPOSettings`` plus the reward ``judge`` (default: the filter's judge)."""

    judge: JudgeConfig | None = None


class DistillOutput(BaseModel):
    """Run directory (default ``runs/<name>``) and prompts per generation shard."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = None
    shard_size: int = Field(default=64, ge=1)


class DistillConfig(BaseModel):
    """One distillation run (see ``recipes/quickstart.yaml`` and ``recipes/paper.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "distill"
    stages: list[Stage] = ["generate", "filter", "sft"]
    student: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS)
    prompt: PromptConfig = PromptConfig()
    data: dict[str, Any] = {"name": "star1", "star1_split": "train"}
    teacher: TeacherConfig = TeacherConfig()
    filter: FilterConfig = FilterConfig()
    sft: SFTSettings = SFTSettings()
    grpo: GRPOStageConfig = GRPOStageConfig()
    ray: RayConfig = RayConfig()
    output: DistillOutput = DistillOutput()

    @model_validator(mode="after")
    def _check_parts(self) -> DistillConfig:
        from pipelines.data import BenchmarkSpec

        spec = BenchmarkSpec(**self.data)
        if spec.name == "star1" and spec.star1_split in (None, "dev"):
            raise ValueError("data.star1_split: the dev split is kept for evaluation; train on star1_split: train "
                             "(or all, when no evaluation uses the dev split)")
        if self.teacher.backend == "replay" and spec.name != "star1":
            raise ValueError(f"teacher.backend: replay reads STAR-1's response field; data.name is {spec.name!r}")
        if self.student.adapter or self.student.finetuned:
            raise ValueError("student: name the base model only; the distillation trains its adapter")
        return self

    @property
    def run_dir(self) -> Path:
        """Where this run's files go."""
        return Path(self.output.dir or f"runs/{self.name}")

    @property
    def data_spec(self) -> Any:
        from pipelines.data import BenchmarkSpec

        return BenchmarkSpec(**self.data)

    @property
    def teacher_name(self) -> str:
        """The teacher recorded in every trace."""
        if self.teacher.name:
            return self.teacher.name
        return f"replay:{self.data_spec.name}" if self.teacher.backend == "replay" else self.teacher.model.base

    @property
    def grpo_judge(self) -> JudgeConfig:
        """GRPO's reward judge: ``grpo.judge``, else the filter's."""
        return self.grpo.judge or self.filter.judge

    def stage_section(self, stage: str) -> dict[str, Any]:
        """The parts of the config a stage's output depends on (recorded in its ``stage.json``)."""
        dump = self.model_dump(mode="json")
        sections = {
            "generate": {"data": dump["data"], "teacher": {k: v for k, v in dump["teacher"].items() if k != "resources"},
                         "shard_size": dump["output"]["shard_size"]},
            "filter": {"judge": dump["filter"]["judge"]},
            "sft": {"student": dump["student"], "prompt": dump["prompt"], "sft": dump["sft"]},
            "grpo": {"grpo": dump["grpo"], "judge": self.grpo_judge.model_dump(mode="json")},
        }
        return sections[stage]


# ----------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageDirs:
    """Where each stage writes in a run directory."""

    root: Path

    def of(self, stage: str) -> Path:
        """The directory holding ``stage``'s ``stage.json`` (and most of its output)."""
        return self.root / {"generate": TRACES_DIR, "filter": FILTERED_DIR, "sft": SFT_DIR, "grpo": GRPO_DIR}[stage]

    def outputs(self, stage: str) -> list[Path]:
        """Everything ``--overwrite`` removes for ``stage``."""
        extra = [self.root / ADAPTER_DIR] if stage == "sft" else []
        return [self.of(stage), *extra]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """A stage's ``stage.json``, or ``None``."""
    path = directory / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{STAGE_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    os.replace(temporary, directory / STAGE_FILE)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "config"]


def prepare_stage(config: DistillConfig, stage: str, dirs: StageDirs, overwrite: bool) -> tuple[bool, dict[str, Any]]:
    """Decide whether ``stage`` runs: returns ``(skip, stamp)``.

    The stamp records the stage's config section and which output of the stage before it read
    (that stage's ``output_id``, new each time it completes). A complete stage with the same
    stamp is skipped; a partial one resumes; a different stamp is a ``ConfigError`` unless
    ``overwrite`` (which, like a plain ``overwrite``, removes the output).
    """
    index = STAGES.index(stage)
    upstream = "filter" if stage == "grpo" else (STAGES[index - 1] if index else None)
    input_digest = None
    if upstream is not None:
        previous = read_stamp(dirs.of(upstream))
        if not previous or not previous.get("complete"):
            raise ConfigError(f"stage {stage!r} reads the output of stage {upstream!r}, which {dirs.root} does not hold "
                              f"complete; run --stages {upstream} first")
        input_digest = previous["output_id"]
    if stage == "grpo":
        sft = read_stamp(dirs.of("sft"))
        if not sft or not sft.get("complete"):
            raise ConfigError(f"stage 'grpo' starts from the SFT adapter, and {dirs.root} has no complete sft stage; "
                              "run --stages sft first")
        input_digest = _digest([input_digest, sft["output_id"]])
    stamp = {"stage": stage, "config": config.stage_section(stage), "input": input_digest}
    stamp["digest"] = _digest([stamp["config"], stamp["input"]])
    existing = read_stamp(dirs.of(stage))
    if existing is not None and not overwrite:
        if existing.get("digest") != stamp["digest"]:
            changed = _changed_keys(existing.get("config"), stamp["config"])
            reason = f"config differs in {', '.join(changed)}" if changed else "it read another output of the stage before"
            raise ConfigError(f"stage {stage!r} in {dirs.root} was made differently ({reason}); "
                              "pass --overwrite to redo it, or use another output.dir")
        if existing.get("complete"):
            return True, existing
    if overwrite:
        for path in dirs.outputs(stage):
            if path.exists():
                shutil.rmtree(path)
    _write_stamp(dirs.of(stage), {**stamp, "complete": False})
    return False, stamp


def finish_stage(dirs: StageDirs, stamp: dict[str, Any], summary: dict[str, Any]) -> None:
    """Mark a stage complete (its ``stage.json`` with ``complete: true``, a summary and a new
    ``output_id`` that the stages after it record as their input)."""
    _write_stamp(dirs.of(stamp["stage"]), {**stamp, "complete": True, "summary": summary, "output_id": uuid.uuid4().hex})


# ----------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------


def _schema(kind: str) -> Any:
    import pyarrow as pa

    fields = [
        ("trace_id", pa.string()), ("prompt_id", pa.string()), ("benchmark", pa.string()), ("prompt", pa.string()),
        ("categories", pa.list_(pa.string())), ("teacher", pa.string()), ("sample_index", pa.int64()),
        ("reasoning", pa.string()), ("answer", pa.string()), ("response", pa.string()),
        ("finish_reason", pa.string()), ("reject_reason", pa.string()), ("teacher_prompt", pa.string()),
    ]
    if kind == "judged":
        fields += [("judge", pa.string()), ("judge_unsafe", pa.bool_()), ("judge_score", pa.float64()),
                   ("judge_raw", pa.string()), ("judge_categories", pa.list_(pa.string()))]
    return pa.schema(fields)


def write_parquet(path: Path, rows: list[dict[str, Any]], kind: str = "trace") -> Path:
    """Write rows with the trace (or judged trace) schema, atomically (temporary file, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(kind)
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)
    return path


def read_parquet_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of Parquet files, in the given order."""
    import pyarrow.parquet as pq

    return [row for path in paths for row in pq.read_table(path).to_pylist()]


# ----------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------


def init_ray(ray_config: RayConfig) -> bool:
    """``pipelines.evaluate.init_ray`` with worker output forwarded, so Ray Train's loss logs show."""
    return start_ray(ray_config, log_to_driver=True)


def _pool(resources_config: StageResources) -> Any:
    import ray

    if resources_config.min_actors == resources_config.max_actors:
        return ray.data.ActorPoolStrategy(size=resources_config.min_actors)
    return ray.data.ActorPoolStrategy(min_size=resources_config.min_actors, max_size=resources_config.max_actors)


def _check_pool_gpus(key: str, resources_config: StageResources) -> None:
    import ray

    if resources_config.num_gpus > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise ValueError(f"{key}.num_gpus={resources_config.num_gpus}, but this Ray cluster has no GPUs; set it to 0 "
                         "or connect to a GPU cluster (--ray-address)")


def run_sharded(
    shards: dict[str, list[dict[str, Any]]],
    build_dataset: Callable[[list[dict[str, Any]]], Any],
    write_shard: Callable[[str, list[dict[str, Any]]], None],
    progress: bool,
    description: str,
) -> None:
    """Stream the rows of ``shards`` (each row holds its ``shard`` name) through
    ``build_dataset(rows)`` and call ``write_shard(name, rows)`` as soon as a shard is complete."""
    from ray.data import DataContext
    from tqdm import tqdm

    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.wait_for_min_actors_s = 600  # an unplaceable pool fails instead of hanging forever
    expected = {name: len(rows) for name, rows in shards.items()}
    collected: dict[str, list[dict[str, Any]]] = {name: [] for name in shards}
    dataset = build_dataset([row for rows in shards.values() for row in rows])
    with tqdm(total=len(shards), unit="shard", desc=description, disable=not progress) as bar:
        for row in dataset.iter_rows():
            row = to_plain(dict(row))
            name = row["shard"]
            collected[name].append(row)
            if len(collected[name]) == expected[name]:
                write_shard(name, collected.pop(name))
                bar.update(1)
    if collected:
        missing = {name: expected[name] - len(rows) for name, rows in collected.items()}
        raise RuntimeError(f"the pipeline ended with incomplete shards: {missing}")


# ----------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------


def replay_teacher(batch: dict[str, Any]) -> dict[str, Any]:
    """``map_batches`` function of the replay teacher: its one sample is the row's stored trace
    (``replay_response``), finished by a stop token; same columns as ``SamplerWorker`` adds."""
    out = {key: to_plain(values) for key, values in batch.items()}
    out["responses"] = [[text] for text in out.pop("replay_response")]
    out["finish_reasons"] = [["stop"] for _ in out["responses"]]
    return out


def parse_teacher_sample(text: str, finish_reason: str) -> tuple[str, str, str | None]:
    """``(reasoning, answer, reject_reason)`` of one teacher sample; ``reject_reason`` is ``None``
    for a finished trace (a stop token ended it, ``</think>`` closed the reasoning, neither part
    is empty). The opening ``<think>`` may sit in the teacher's prompt instead of its text."""
    reasoning, answer, _ = split_reasoning(text)
    if finish_reason != "stop":
        return reasoning, answer, f"finish_reason {finish_reason}"
    if THINK_CLOSE not in text:
        return reasoning, answer, "no </think>"
    if not reasoning:
        return reasoning, answer, "empty reasoning"
    if not answer:
        return reasoning, answer, "empty answer"
    return reasoning, answer, None


def traces_from_rows(rows: list[dict[str, Any]], teacher: str) -> list[dict[str, Any]]:
    """Teacher output rows (N ``responses`` / ``finish_reasons`` each) -> one trace per sample."""
    traces = []
    for row in rows:
        for index, (text, reason) in enumerate(zip(row["responses"], row["finish_reasons"])):
            reasoning, answer, reject = parse_teacher_sample(text, reason)
            traces.append({
                "trace_id": f"{row['prompt_id']}#{index}", "prompt_id": row["prompt_id"], "benchmark": row["benchmark"],
                "prompt": row["prompt"], "categories": list(row["categories"]), "teacher": teacher,
                "sample_index": index, "reasoning": reasoning, "answer": answer, "response": text,
                "finish_reason": reason, "reject_reason": reject, "teacher_prompt": row["teacher_prompt"],
            })
    return sorted(traces, key=lambda trace: trace["trace_id"])


def teacher_records(config: DistillConfig) -> list[dict[str, Any]]:
    """The data set's prompts with their ``teacher_prompt`` (and, for replay, ``replay_response``).

    Raises ``PolicyError`` naming the prompt for a prompt without a category or with an unknown one.
    """
    from pipelines.data import load_benchmark, load_star1_responses

    spec = config.data_spec
    records = load_benchmark(spec)
    policies = load_policies(config.teacher.policies)
    template = load_teacher_template(config.teacher.template)
    for record in records:
        try:
            record["teacher_prompt"] = teacher_prompt(record["prompt"], record["categories"], policies, template)
        except PolicyError as err:
            raise PolicyError(f"prompt {record['prompt_id']}: {err}") from None
    if config.teacher.backend == "replay":
        responses = load_star1_responses(spec)
        for record in records:
            record["replay_response"] = responses[record["prompt_id"]]
    return records


def build_teacher_dataset(config: DistillConfig, rows: list[dict[str, Any]]) -> Any:
    """Ray Data plan: prompts -> teacher (replay function, or a ``SamplerWorker`` pool)."""
    import ray

    from actors.sampler import SamplerWorker

    pool = config.teacher.resources
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / pool.batch_size)))
    if config.teacher.backend == "replay":
        return dataset.map_batches(replay_teacher, batch_size=pool.batch_size, num_cpus=0.25)
    _check_pool_gpus("teacher.resources", pool)
    return dataset.map_batches(
        SamplerWorker,
        fn_constructor_kwargs={
            "spec": config.teacher.model.model_dump(), "sampling": config.teacher.sampling,
            "backend": config.teacher.backend, "backend_options": config.teacher.options,
            "prompt_column": "teacher_prompt", "torch_threads": pool.torch_threads,
        },
        compute=_pool(pool),
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )


def summarise_traces(finished: list[dict[str, Any]], unfinished: list[dict[str, Any]], prompts: int) -> dict[str, Any]:
    """Counts of the generate stage: prompts, traces, finished, unfinished per reason, finished per category."""
    reasons: dict[str, int] = {}
    for trace in unfinished:
        reasons[trace["reject_reason"]] = reasons.get(trace["reject_reason"], 0) + 1
    categories: dict[str, int] = {}
    for trace in finished:
        for category in trace["categories"]:
            categories[category] = categories.get(category, 0) + 1
    return {"prompts": prompts, "traces": len(finished) + len(unfinished), "finished": len(finished),
            "unfinished": reasons, "finished_per_category": dict(sorted(categories.items()))}


def stage_generate(config: DistillConfig, dirs: StageDirs, progress: bool) -> dict[str, Any]:
    """Teacher traces into ``traces/`` (finished) and ``traces/unfinished/``; returns the summary."""
    traces_dir = dirs.of("generate")
    records = teacher_records(config)
    shards = assign_shards(records, config.output.shard_size)
    pending = {name: rows for name, rows in shards.items() if not (traces_dir / name).is_file()}
    logger.info("generate: %d prompts in %d shards, %d to do (teacher %s)", len(records), len(shards), len(pending),
                config.teacher_name)

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        traces = traces_from_rows(rows, config.teacher_name)
        write_parquet(traces_dir / "unfinished" / name, [t for t in traces if t["reject_reason"]])
        write_parquet(traces_dir / name, [t for t in traces if not t["reject_reason"]])  # last: marks the shard done

    if pending:
        run_sharded(pending, lambda rows: build_teacher_dataset(config, rows), write, progress, "teacher shards")
    finished = read_parquet_rows(sorted(traces_dir / name for name in shards))
    unfinished = read_parquet_rows(sorted(traces_dir / "unfinished" / name for name in shards))
    summary = summarise_traces(finished, unfinished, len(records))
    (traces_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def trace_files(dirs: StageDirs) -> list[Path]:
    """The finished-trace shards of the generate stage, in order."""
    return sorted(dirs.of("generate").glob("*.parquet"))


# ----------------------------------------------------------------------------------------
# filter
# ----------------------------------------------------------------------------------------


def build_judge_dataset(config: DistillConfig, rows: list[dict[str, Any]]) -> Any:
    """Ray Data plan: traces (with a one-element ``judge_input``) -> judge pool."""
    import ray

    from actors.judge import JudgeWorker

    pool = config.filter.resources
    _check_pool_gpus("filter.resources", pool)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / pool.batch_size)))
    return dataset.map_batches(
        JudgeWorker,
        fn_constructor_kwargs={"judge": config.filter.judge.name, "options": config.filter.judge.options,
                               "prompt_column": "prompt", "responses_column": "judge_input",
                               "torch_threads": pool.torch_threads},
        compute=_pool(pool),
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
    )


def judged_trace(row: dict[str, Any], judge: str) -> dict[str, Any]:
    """A judge output row (one-element verdict lists) -> a trace row with ``judge_*`` columns."""
    # only finished traces reach the judge; their empty reject_reason may come back from Ray Data as NaN
    return {**row, "reject_reason": None, "judge": judge, "judge_unsafe": bool(row["unsafe"][0]),
            "judge_score": row["judge_score"][0],
            "judge_raw": row["judge_raw"][0], "judge_categories": list(row["judge_categories"][0])}


def filter_counts(kept: list[dict[str, Any]], rejected: list[dict[str, Any]], judge: str) -> dict[str, Any]:
    """Counts of the filter stage, in total and per category (a trace counts in each of its categories)."""
    per_category: dict[str, dict[str, int]] = {}
    for label, rows in (("kept", kept), ("rejected", rejected)):
        for row in rows:
            for category in row["categories"]:
                counts = per_category.setdefault(category, {"kept": 0, "rejected": 0})
                counts[label] += 1
    return {"judge": judge, "total": len(kept) + len(rejected), "kept": len(kept), "rejected": len(rejected),
            "per_category": dict(sorted(per_category.items()))}


def stage_filter(config: DistillConfig, dirs: StageDirs, progress: bool) -> dict[str, Any]:
    """Judge every finished trace; write ``filtered/kept.parquet``, ``rejected.parquet`` and
    ``counts.json``; returns the counts. Judged shards are kept, so a rerun resumes."""
    filtered_dir = dirs.of("filter")
    judge = config.filter.judge.name
    shards: dict[str, list[dict[str, Any]]] = {}
    for path in trace_files(dirs):
        shards[path.name] = [{**row, "shard": path.name, "judge_input": [trace_text(row["reasoning"], row["answer"])]}
                             for row in read_parquet_rows([path])]
    shards = {name: rows for name, rows in shards.items() if rows}
    pending = {name: rows for name, rows in shards.items() if not (filtered_dir / "shards" / name).is_file()}
    logger.info("filter: %d traces in %d shards, %d to do (judge %s)", sum(map(len, shards.values())), len(shards),
                len(pending), judge)

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        judged = sorted((judged_trace(row, judge) for row in rows), key=lambda row: row["trace_id"])
        write_parquet(filtered_dir / "shards" / name, judged, kind="judged")

    if pending:
        run_sharded(pending, lambda rows: build_judge_dataset(config, rows), write, progress, "judged shards")
    judged = read_parquet_rows(sorted(filtered_dir / "shards" / name for name in shards))
    kept = [row for row in judged if not row["judge_unsafe"]]
    rejected = [row for row in judged if row["judge_unsafe"]]
    write_parquet(filtered_dir / "kept.parquet", kept, kind="judged")
    write_parquet(filtered_dir / "rejected.parquet", rejected, kind="judged")
    counts = filter_counts(kept, rejected, judge)
    (filtered_dir / "counts.json").write_text(json.dumps(counts, indent=2))
    return counts


# ----------------------------------------------------------------------------------------
# sft
# ----------------------------------------------------------------------------------------


def select_sft_examples(
    rows: list[dict[str, Any]], tokenizer: Any, prompt: PromptConfig, settings: SFTSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenized SFT examples from kept traces, and what was selected.

    Each example is ``actors.trainer.sft_example`` of (prompt, completion after the response
    prefix) plus its ``trace_id``. With ``settings.drop_longer`` examples over
    ``settings.max_length`` tokens are dropped (else TRL truncates them); ``settings.max_examples``
    keeps a seeded sample, in trace order.
    """
    from actors.trainer import completion_text, sft_example

    examples = []
    for row in sorted(rows, key=lambda row: row["trace_id"]):
        completion = completion_text(row["reasoning"], row["answer"], prompt.response_prefix)
        example = sft_example(tokenizer, row["prompt"], completion, prompt.system_prompt, prompt.response_prefix)
        examples.append({"trace_id": row["trace_id"], **example})
    longer = sum(len(e["input_ids"]) > settings.max_length for e in examples)
    if settings.drop_longer:
        examples = [e for e in examples if len(e["input_ids"]) <= settings.max_length]
    if settings.max_examples is not None and len(examples) > settings.max_examples:
        chosen = set(random.Random(settings.selection_seed).sample(range(len(examples)), settings.max_examples))
        examples = [e for i, e in enumerate(examples) if i in chosen]
    if not examples:
        raise ValueError(f"sft: no training example left from {len(rows)} kept traces "
                         f"(sft.max_length={settings.max_length}, sft.drop_longer={settings.drop_longer})")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    selection = {
        "kept_traces": len(rows), "longer_than_max_length": longer,
        "dropped_longer": longer if settings.drop_longer else 0, "examples": len(examples),
        "tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1], "total": sum(lengths)},
        "trace_ids": [e["trace_id"] for e in examples],
    }
    return examples, selection


def stage_sft(config: DistillConfig, dirs: StageDirs, progress: bool) -> dict[str, Any]:
    """LoRA SFT in Ray Train on the kept traces; exports ``adapter/``; returns a summary."""
    from actors.models import load_tokenizer
    from actors.trainer import (
        check_think_tokens,
        checkpoint_state,
        export_adapter,
        run_training,
        sft_train_loop,
        steps_per_epoch,
    )

    settings = config.sft
    kept = read_parquet_rows([dirs.of("filter") / "kept.parquet"])
    tokenizer = load_tokenizer(config.student.base, config.student.trust_remote_code)
    think_tokens = check_think_tokens(tokenizer)
    examples, selection = select_sft_examples(kept, tokenizer, config.prompt, settings)
    (dirs.of("sft") / "selection.json").write_text(json.dumps(selection, indent=2))
    per_epoch = steps_per_epoch(len(examples), settings.per_device_batch_size, settings.scaling.num_workers,
                                settings.gradient_accumulation_steps)
    logger.info("sft: %d examples (%d-%d tokens), %s epochs of %d steps, lr %g, LoRA r %d; think tags as text (%s tokens)",
                len(examples), selection["tokens"]["min"], selection["tokens"]["max"], settings.num_epochs, per_epoch,
                settings.learning_rate, settings.lora.r, "/".join(map(str, think_tokens.values())))
    result = run_training(
        sft_train_loop,
        {"model": config.student.base, "dtype": config.student.dtype, "settings": settings.model_dump(mode="json"),
         "progress": progress},
        [{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]} for e in examples],
        settings.scaling, storage_path=dirs.root.resolve(), name=SFT_DIR, checkpoints_to_keep=settings.checkpoints_to_keep,
    )
    state = checkpoint_state(result.checkpoint)
    adapter_dir = export_adapter(result.checkpoint, dirs.root / ADAPTER_DIR)
    save_config(config, adapter_dir / CONFIG_FILE)
    losses = [(entry["step"], entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry]
    summary = {"adapter": str(adapter_dir), "examples": len(examples), "global_step": state.get("global_step"),
               "epoch": state.get("epoch"), "first_loss": losses[0][1] if losses else None,
               "last_loss": losses[-1][1] if losses else None, "think_tokens": think_tokens}
    (adapter_dir / "training.json").write_text(json.dumps({**summary, "loss_history": losses}, indent=2))
    return summary


# ----------------------------------------------------------------------------------------
# grpo
# ----------------------------------------------------------------------------------------


def grpo_prompts(rows: list[dict[str, Any]], tokenizer: Any, prompt: PromptConfig, settings: GRPOSettings) -> list[dict[str, str]]:
    """One GRPO row per kept prompt: ``prompt`` (the student's templated prompt text, see
    ``actors.trainer.prompt_text_for_trl``) and ``question``; ``settings.max_prompts`` keeps a
    seeded sample."""
    from actors.trainer import prompt_text_for_trl

    questions = {row["prompt_id"]: row["prompt"] for row in rows}
    ids = sorted(questions)
    if settings.max_prompts is not None and len(ids) > settings.max_prompts:
        ids = sorted(random.Random(settings.prompt_seed).sample(ids, settings.max_prompts))
    return [{"prompt": prompt_text_for_trl(tokenizer, questions[i], prompt.system_prompt, prompt.response_prefix),
             "question": questions[i]} for i in ids]


def stage_grpo(config: DistillConfig, dirs: StageDirs, progress: bool) -> dict[str, Any]:
    """GRPO in Ray Train from the SFT adapter; exports ``grpo/adapter``; returns a summary."""
    from actors.models import load_tokenizer
    from actors.trainer import (
        checkpoint_state,
        export_adapter,
        grpo_train_loop,
        run_training,
    )

    settings = config.grpo
    kept = read_parquet_rows([dirs.of("filter") / "kept.parquet"])
    tokenizer = load_tokenizer(config.student.base, config.student.trust_remote_code)
    rows = grpo_prompts(kept, tokenizer, config.prompt, settings)
    judge = config.grpo_judge
    logger.info("grpo: %d prompts x %d generations, beta %g, reward %s of judge %s", len(rows), settings.num_generations,
                settings.beta, settings.reward, judge.name)
    result = run_training(
        grpo_train_loop,
        {"model": config.student.base, "adapter": str((dirs.root / ADAPTER_DIR).resolve()), "dtype": config.student.dtype,
         "settings": settings.model_dump(mode="json", exclude={"judge"}), "judge": judge.name,
         "judge_options": judge.options, "progress": progress},
        rows, settings.scaling, storage_path=dirs.root.resolve(), name=GRPO_DIR,
        checkpoints_to_keep=settings.checkpoints_to_keep,
    )
    state = checkpoint_state(result.checkpoint)
    adapter_dir = export_adapter(result.checkpoint, dirs.of("grpo") / ADAPTER_DIR)
    save_config(config, adapter_dir / CONFIG_FILE)
    rewards = [entry.get("reward") for entry in state.get("log_history", []) if "reward" in entry]
    summary = {"adapter": str(adapter_dir), "prompts": len(rows), "global_step": state.get("global_step"),
               "epoch": state.get("epoch"), "first_reward": rewards[0] if rewards else None,
               "last_reward": rewards[-1] if rewards else None}
    (adapter_dir / "training.json").write_text(json.dumps({**summary, "reward_history": rewards}, indent=2))
    return summary


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

STAGE_RUNNERS: dict[str, Callable[[DistillConfig, StageDirs, bool], dict[str, Any]]] = {
    "generate": stage_generate,
    "filter": stage_filter,
    "sft": stage_sft,
    "grpo": stage_grpo,
}


def parse_stages(text: str | None) -> list[str] | None:
    """``"generate,filter"`` -> the stages in pipeline order; ``None`` when not given."""
    if not text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ConfigError(f"--stages: unknown {unknown or text!r}; expected a comma list of {', '.join(STAGES)}")
    return [stage for stage in STAGES if stage in names]


def run_distill(config: DistillConfig, stages: list[str] | None = None, overwrite: bool = False,
                progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run the given stages (default ``config.stages``) in pipeline order; returns each stage's
    summary (``{"skipped": true, ...}`` for a stage already complete)."""
    import ray

    stages = [stage for stage in STAGES if stage in (stages or config.stages)]
    dirs = StageDirs(config.run_dir)
    dirs.root.mkdir(parents=True, exist_ok=True)
    save_config(config, dirs.root / CONFIG_FILE)
    summaries: dict[str, dict[str, Any]] = {}
    started = False
    try:
        for stage in stages:
            skip, stamp = prepare_stage(config, stage, dirs, overwrite)
            if skip:
                logger.info("%s: complete in %s, skipped (--overwrite redoes it)", stage, dirs.of(stage))
                summaries[stage] = {"skipped": True, **stamp.get("summary", {})}
                continue
            started = init_ray(config.ray) or started
            summary = STAGE_RUNNERS[stage](config, dirs, progress)
            finish_stage(dirs, stamp, summary)
            summaries[stage] = summary
    finally:
        if started:
            ray.shutdown()
    return summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon distill`` options: a recipe, overrides and which stages to run."""
    parser.add_argument("--config", type=Path, help="YAML recipe (e.g. recipes/quickstart.yaml); defaults apply without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key with a dotted path, e.g. --set sft.num_epochs=1 (repeatable)")
    parser.add_argument("--stages", help=f"comma list of stages to run ({','.join(STAGES)}; default: the recipe's stages)")
    parser.add_argument("--limit", type=int, help="first N prompts of the data set (data.limit)")
    parser.add_argument("--out", help="run directory (output.dir; default runs/<name>)")
    parser.add_argument("--ray-address", help="connect to this Ray cluster (e.g. auto) instead of starting one")
    parser.add_argument("--overwrite", action="store_true", help="redo the stages asked for, discarding their output")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The recipe at ``--config`` with every flag applied as an override."""
    data = read_yaml(args.config) if args.config else {}
    overrides = list(args.overrides)
    pairs = {"data.limit": args.limit, "output.dir": args.out, "ray.address": args.ray_address}
    overrides += [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]
    return build_config(DistillConfig, data, overrides)


def run(args: argparse.Namespace) -> int:
    """``dabon distill``: run the stages, then print what each wrote."""
    config = config_from_args(args)
    summaries = run_distill(config, parse_stages(args.stages), overwrite=args.overwrite, progress=not args.no_progress)
    print(f"run directory: {config.run_dir}")
    for stage, summary in summaries.items():
        shown = {k: v for k, v in summary.items() if k not in ("trace_ids",)}
        print(f"{stage}: {json.dumps(shown)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.distill``."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # before Ray Train starts (RAY_NOTES.md)
    parser = argparse.ArgumentParser(prog="python -m pipelines.distill", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from pipelines.cli import run_guarded

    return run_guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
