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

    config.yaml                    the resolved config of the latest invocation (every default included)
    traces/<shard>.parquet         generate: finished teacher traces (prompt, categories, reasoning,
    traces/unfinished/...          answer, teacher, ...); unfinished ones apart; summary.json last
    filtered/{kept,rejected}.parquet + counts.json      filter: judge verdicts, counts per category
    sft/                           Ray Train storage of the SFT run (checkpoint per epoch)
    adapter/                       the final SFT LoRA adapter + prompt.yaml + config.yaml + training.json
    checkpoints/step-<S>/          every kept SFT checkpoint as an adapter (+ prompt.yaml); index.json
    grpo/  grpo/adapter/           GRPO's Ray Train storage and its final adapter

1. **generate**: Ray Data over the data set's prompts (``question`` + ``category``). Each prompt
   is wrapped in the teacher template (``pipelines/teacher_prompt.txt``) with the policies of its
   categories (``pipelines/policies.yaml``; an unknown category is an error) and sampled through
   a sampler backend (``hf``, ``vllm``, ``openai``), or, with the ``replay`` teacher, answered by
   the trace already in the data (STAR-1's ``response``, DeepSeek-R1's), so the pipeline runs
   offline. A trace is kept when it finished (stop token, a closing ``</think>``, non-empty
   reasoning and answer). Shards already on disk are skipped on a rerun.
2. **filter**: any judge of ``actors.judge`` over (prompt, the teacher's response with its
   prompt's prefix put back: ``actors.judge.judge_input``, the rule the GRPO reward and the
   evaluation judge by too). It judges both ways (``filter_reason``): a harmful prompt's trace is
   kept when judged safe, a benign prompt's (``benign.data``) when it answers (a refusal of a
   benign prompt is rejected); ``counts.json`` counts both per kind and per category.
3. **sft**: ``actors.trainer``: TRL ``SFTTrainer`` + LoRA inside a Ray Train ``TorchTrainer``;
   prompt = the student's own chat template + ``prompt.system_prompt`` + ``prompt.response_prefix``
   (the same ``actors.chat`` ids the evaluation sampler builds), loss on the completion only.
   An interrupted run resumes from its latest epoch checkpoint. The adapter directory holds
   ``prompt.yaml``, the ``PromptConfig`` it was trained with, so evaluation and serving can use
   the same prompt.
4. **grpo** (optional): TRL ``GRPOTrainer`` from the SFT adapter (trainable), reward = the judge
   calls the completion safe.

A stage whose output is complete is skipped; ``--overwrite`` redoes the stages asked for. Each
stage records the config it ran with (``stage.json``) and the stage it read; running it again
with a different config, or on top of a redone earlier stage, is an error until ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from actors import storage
from actors.chat import PROMPT_FILE, completion_text, parse_response
from actors.config import (
    ConfigError,
    LightPoolConfig,
    PoolConfig,
    PromptConfig,
    RayConfig,
    Strict,
    build_config,
    config_yaml,
    options_by_kind,
    read_yaml,
)
from actors.judge import JudgeConfig
from actors.models import EMBEDDED_ALIAS, ModelSpec, check_spec
from actors.rows import to_plain
from actors.runtime import (
    assign_shards,
    blocks_for,
    check_pools,
    check_shared_location,
    init_ray,
    pool_options,
    stream_shards,
)
from actors.sampler import BACKEND_OPTIONS, BackendOptions, GeneratorConfig, SamplingConfig
from actors.settings import get_logger
from actors.trainer import GRPOSettings, SFTSettings
from actors.vllm_engine import add_vllm_sampling, check_engine_fits, check_pool_matches_engine
from pipelines.args import add_config_arguments, add_output_arguments, command_main, set_flags
from pipelines.data import BenchmarkSpec
from pipelines.policies import PolicyError, load_policies, load_teacher_template, teacher_prompt
from pipelines.stages import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    GRPO_DIR,
    SFT_DIR,
    STAGES,
    Output,
    Stage,
    StageDirs,
    finish_stage,
    prepare_stage,
)

logger = get_logger(__name__)


# How the paper's students see a prompt (METHOD.md section 1).
STUDENT_PROMPT = PromptConfig(system_prompt="You are a helpful assistant.", response_prefix="<think>\n")
# The paper's teacher sampling (METHOD.md section 1).
TEACHER_SAMPLING = SamplingConfig(n=1, temperature=0.6, top_p=0.95, max_new_tokens=2048)


# ----------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------


class ReplayOptions(Strict):
    """Options of the ``replay`` teacher: none (it reads the data set's traces)."""


TEACHER_OPTIONS: dict[str, type[Strict]] = {**BACKEND_OPTIONS, "replay": ReplayOptions}
REPLAY_TAKES_NOTHING = "model: the replay teacher reads traces from the data; it takes no model or options"


class TeacherConfig(Strict):
    """The teacher. ``backend``: ``replay`` (the data set's own ``response`` traces, no model) or
    a sampler backend (``hf``, ``vllm``, ``openai``) with ``model`` and backend ``options`` (the
    backend's options model, validated once; see ``actors.sampler.GeneratorConfig``). ``sampling``:
    paper: temperature 0.6, top-p 0.95, 2048 new tokens. ``prompt``: how the teacher model sees its
    prompt (a reasoning model's template often opens ``<think>`` itself). ``name``: recorded in
    every trace (default: the model, or ``replay:<data>``). ``policies`` / ``template``: files
    replacing the packaged ones. ``resources``: the sampler pool."""

    backend: Literal["replay", "hf", "vllm", "openai"] = "replay"
    name: str | None = None
    model: ModelSpec | None = None
    options: BackendOptions | ReplayOptions = ReplayOptions()
    sampling: SamplingConfig = TEACHER_SAMPLING
    prompt: PromptConfig = PromptConfig()
    policies: str | None = None
    template: str | None = None
    resources: PoolConfig = PoolConfig()

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend", "replay") == "replay":
            options = data.get("options")
            if options and not isinstance(options, ReplayOptions):
                raise ValueError(REPLAY_TAKES_NOTHING)
        return options_by_kind(data, "backend", "replay", TEACHER_OPTIONS)

    @model_validator(mode="after")
    def _model_fits_backend(self) -> "TeacherConfig":
        if self.backend == "replay":
            if self.model is not None:
                raise ValueError(REPLAY_TAKES_NOTHING)
            return self
        if self.model is None:
            raise ValueError(f"model: the {self.backend} teacher needs a model (base: Hub id, local dir or served name)")
        return self

    def generator(self) -> GeneratorConfig:
        """The sampler backend of a model teacher (its options as they are, not validated again)."""
        return GeneratorConfig(backend=self.backend, options=self.options)


class FilterConfig(Strict):
    """The judge that filters traces (``keyword``, ``llama_guard``, ``openai``) and its actor pool."""

    judge: JudgeConfig = JudgeConfig()
    resources: LightPoolConfig = LightPoolConfig()


class BenignMixConfig(Strict):
    """The benign part of the training mix: harmless prompts whose traces *answer* (the Benign
    policy: comply), so that the student does not learn to refuse everything.

    ``data``: any benchmark; every prompt of it counts as benign (category ``Benign``), e.g.
    ``star1_benign`` (STAR-1's companion set, Hub ``UCSC-VLAA/STAR-benign-915``) or, offline, GSM8K's
    ``train`` part (``part: train`` with a ``train_fraction``, kept apart from every evaluation
    part). With the replay teacher its stored traces are replayed (``pipelines.data.REPLAY_SOURCES``).
    ``share``: the fraction of SFT examples drawn from benign traces (the rest from ``data``'s);
    ``sft.max_examples`` bounds the two together.
    """

    data: BenchmarkSpec
    share: float = Field(default=0.5, gt=0, lt=1)


class GRPOStageConfig(GRPOSettings):
    """``GRPOSettings`` plus the reward ``judge`` (default: the filter's judge)."""

    judge: JudgeConfig | None = None


class DistillOutput(Strict):
    """Run directory (default ``runs/<name>``; a path or a storage URI) and prompts per generation shard."""

    dir: str | None = None
    shard_size: int = Field(default=64, ge=1)


class DistillConfig(Strict):
    """One distillation run (see ``recipes/quickstart.yaml`` and ``recipes/paper.yaml``).

    ``model``: the student's base model (the run trains its adapter). ``prompt``: how the student
    sees a prompt at train and test time. ``data``: the prompts (a ``pipelines.data.BenchmarkSpec``).
    """

    name: str = "distill"
    stages: list[Stage] = ["generate", "filter", "sft"]
    model: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS)
    prompt: PromptConfig = STUDENT_PROMPT
    data: BenchmarkSpec = BenchmarkSpec(name="star1", star1_split="train")
    benign: BenignMixConfig | None = None
    teacher: TeacherConfig = TeacherConfig()
    filter: FilterConfig = FilterConfig()
    sft: SFTSettings = SFTSettings()
    grpo: GRPOStageConfig = GRPOStageConfig()
    ray: RayConfig = RayConfig()
    output: DistillOutput = DistillOutput()

    @model_validator(mode="after")
    def _check_parts(self) -> "DistillConfig":
        if not "<think>\n".startswith(self.prompt.response_prefix):
            raise ValueError("prompt.response_prefix: expected '<think>\\n', '<think>' or '' (a start of '<think>\\n'), "
                             f"got {self.prompt.response_prefix!r}")
        if self.data.name == "star1" and self.data.star1_split in (None, "dev"):
            raise ValueError("data.star1_split: the dev split is kept for evaluation; train on star1_split: train "
                             "(or all, when no evaluation uses the dev split)")
        if self.teacher.backend == "replay":
            from pipelines.data import REPLAY_SOURCES

            for key, spec in (("data", self.data), ("benign.data", self.benign.data if self.benign else None)):
                if spec is not None and spec.name not in REPLAY_SOURCES:
                    raise ValueError(f"teacher.backend: replay reads stored traces, and {key}.name {spec.name!r} has none "
                                     f"(benchmarks with traces: {', '.join(REPLAY_SOURCES)})")
        if self.benign and self.benign.data.name == "star1" and self.benign.data.star1_split in (None, "dev"):
            raise ValueError("benign.data.star1_split: the dev split is kept for evaluation")
        if self.model.adapter or self.model.finetuned:
            raise ValueError("model: name the student's base model only; the distillation trains its adapter")
        return self

    @property
    def run_dir(self) -> str:
        """Where this run's files go (a path or a storage URI)."""
        return self.output.dir or f"runs/{self.name}"

    @property
    def teacher_name(self) -> str:
        """The teacher recorded in every trace."""
        if self.teacher.name:
            return self.teacher.name
        return f"replay:{self.data.name}" if self.teacher.backend == "replay" else self.teacher.model.base

    @property
    def grpo_judge(self) -> JudgeConfig:
        """GRPO's reward judge: ``grpo.judge``, else the filter's."""
        return self.grpo.judge or self.filter.judge

    def stage_section(self, stage: str) -> dict[str, Any]:
        """The parts of the config a stage's output depends on (recorded in its ``stage.json``)."""
        dump = self.model_dump(mode="json")
        sections = {
            "generate": {"data": dump["data"], "teacher": {k: v for k, v in dump["teacher"].items() if k != "resources"},
                         "shard_size": dump["output"]["shard_size"],
                         **({"benign": dump["benign"]["data"]} if self.benign else {})},
            "filter": {"judge": dump["filter"]["judge"]},
            "sft": {"model": dump["model"], "prompt": dump["prompt"], "sft": dump["sft"],
                    **({"benign_share": self.benign.share} if self.benign else {})},
            "grpo": {"grpo": dump["grpo"], "judge": self.grpo_judge.model_dump(mode="json")},
        }
        return sections[stage]


# ----------------------------------------------------------------------------------------
# Trace tables
# ----------------------------------------------------------------------------------------


def _schema(kind: str) -> Any:
    import pyarrow as pa

    fields = [
        ("trace_id", pa.string()), ("prompt_id", pa.string()), ("benchmark", pa.string()), ("prompt", pa.string()),
        ("kind", pa.string()), ("categories", pa.list_(pa.string())), ("teacher", pa.string()), ("sample_index", pa.int64()),
        ("reasoning", pa.string()), ("answer", pa.string()), ("response", pa.string()),
        ("finish_reason", pa.string()), ("reject_reason", pa.string()), ("teacher_prompt", pa.string()),
    ]
    if kind == "judged":
        fields += [("judge", pa.string()), ("judge_unsafe", pa.bool_()), ("judge_score", pa.float64()),
                   ("judge_raw", pa.string()), ("judge_categories", pa.list_(pa.string())), ("judge_error", pa.bool_())]
    return pa.schema(fields)


def write_traces(location: str, rows: list[dict[str, Any]], kind: str = "trace") -> str:
    """Write rows with the trace (or judged trace) schema as one Parquet file, atomically."""
    schema = _schema(kind)
    return storage.write_parquet(location, [{name: row.get(name) for name in schema.names} for row in rows], schema)


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


def parse_teacher_sample(text: str, finish_reason: str, response_prefix: str = "") -> tuple[str, str, str | None]:
    """``(reasoning, answer, reject_reason)`` of one teacher sample by the answer rule of
    ``actors.chat`` (the teacher prompt's ``response_prefix`` put back first); ``reject_reason``
    is ``None`` for a finished trace (a stop token ended it, ``</think>`` closed the reasoning,
    neither part is empty). The opening ``<think>`` may sit in the teacher's template instead."""
    parsed = parse_response(text, response_prefix)
    if finish_reason != "stop":
        return parsed.reasoning, parsed.answer, f"finish_reason {finish_reason}"
    if not parsed.finished or not parsed.has_reasoning:
        return parsed.reasoning, parsed.answer, "no </think>"
    if not parsed.reasoning:
        return parsed.reasoning, parsed.answer, "empty reasoning"
    if not parsed.answer:
        return parsed.reasoning, parsed.answer, "empty answer"
    return parsed.reasoning, parsed.answer, None


def traces_from_rows(rows: list[dict[str, Any]], teacher: str, response_prefix: str = "") -> list[dict[str, Any]]:
    """Teacher output rows (N ``responses`` / ``finish_reasons`` each) -> one trace per sample."""
    traces = []
    for row in rows:
        for index, (text, reason) in enumerate(zip(row["responses"], row["finish_reasons"])):
            reasoning, answer, reject = parse_teacher_sample(text, reason, response_prefix)
            traces.append({
                "trace_id": f"{row['prompt_id']}#{index}", "prompt_id": row["prompt_id"], "benchmark": row["benchmark"],
                "prompt": row["prompt"], "kind": row.get("kind") or "harmful", "categories": list(row["categories"]), "teacher": teacher,
                "sample_index": index, "reasoning": reasoning, "answer": answer, "response": text,
                "finish_reason": reason, "reject_reason": reject, "teacher_prompt": row["teacher_prompt"],
            })
    return sorted(traces, key=lambda trace: trace["trace_id"])


BENIGN_CATEGORY = "Benign"


def teacher_records(config: DistillConfig) -> list[dict[str, Any]]:
    """The data set's prompts, then the benign part's (``benign.data``; kind ``benign``, category
    ``Benign``), each with its ``teacher_prompt`` (and, for replay, ``replay_response``).

    Raises ``PolicyError`` naming the prompt for a prompt without a category or with an unknown
    one, and ``ConfigError`` when the two parts share a prompt id.
    """
    from pipelines.data import load_benchmark, load_replay_responses

    specs = [config.data] + ([config.benign.data] if config.benign else [])
    records = load_benchmark(config.data)
    if config.benign:
        benign = [{**record, "kind": "benign", "categories": [BENIGN_CATEGORY]} for record in load_benchmark(config.benign.data)]
        shared = {record["prompt_id"] for record in records} & {record["prompt_id"] for record in benign}
        if shared:
            raise ConfigError(f"benign.data: {len(shared)} prompt ids are in data too (e.g. {sorted(shared)[0]!r}); "
                              "the benign part must be other prompts")
        records += benign
    policies = load_policies(config.teacher.policies)
    template = load_teacher_template(config.teacher.template)
    for record in records:
        try:
            record["teacher_prompt"] = teacher_prompt(record["prompt"], record["categories"], policies, template)
        except PolicyError as err:
            raise PolicyError(f"prompt {record['prompt_id']}: {err}") from None
    if config.teacher.backend == "replay":
        responses = {key: text for spec in specs for key, text in load_replay_responses(spec).items()}
        for record in records:
            record["replay_response"] = responses[record["prompt_id"]]
    return records


def build_teacher_dataset(config: DistillConfig, rows: list[dict[str, Any]]) -> Any:
    """Ray Data plan: prompts -> teacher (replay function, or a ``SamplerWorker`` pool)."""
    import ray

    from actors.sampler import SamplerWorker

    pool = config.teacher.resources
    dataset = ray.data.from_items(rows, override_num_blocks=blocks_for(len(rows), pool.batch_size))
    if config.teacher.backend == "replay":
        return dataset.map_batches(replay_teacher, batch_size=pool.batch_size, num_cpus=0.25)
    check_pools([("teacher.resources", pool)])
    if config.teacher.backend == "vllm":  # the evaluation's stage: Ray Data's LLM processor
        return add_vllm_sampling(dataset, config.teacher.model, config.teacher.prompt, config.teacher.sampling,
                                 config.teacher.options, pool, prompt_column="teacher_prompt")
    return dataset.map_batches(
        SamplerWorker,
        fn_constructor_kwargs={
            "spec": config.teacher.model, "sampling": config.teacher.sampling, "prompt": config.teacher.prompt,
            "generator": config.teacher.generator(), "prompt_column": "teacher_prompt",
            "torch_threads": pool.torch_threads,
        },
        **pool_options(pool),
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
    kinds: dict[str, dict[str, int]] = {}
    for label, traces in (("finished", finished), ("unfinished", unfinished)):
        for trace in traces:
            counts = kinds.setdefault(trace.get("kind") or "harmful", {"finished": 0, "unfinished": 0})
            counts[label] += 1
    return {"prompts": prompts, "traces": len(finished) + len(unfinished), "finished": len(finished),
            "unfinished": reasons, "per_kind": dict(sorted(kinds.items())),
            "finished_per_category": dict(sorted(categories.items()))}


def stage_generate(config: DistillConfig, dirs: StageDirs, output: Output) -> dict[str, Any]:
    """Teacher traces into ``traces/`` (finished) and ``traces/unfinished/``; returns the summary."""
    traces_dir = dirs.of("generate")
    records = teacher_records(config)
    shards = assign_shards(records, config.output.shard_size)
    pending = {name: rows for name, rows in shards.items() if not storage.is_file(storage.join(traces_dir, name))}
    logger.info("generate: %d prompts in %d shards, %d to do (teacher %s)", len(records), len(shards), len(pending),
                config.teacher_name)

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        traces = traces_from_rows(rows, config.teacher_name, config.teacher.prompt.response_prefix)
        write_traces(storage.join(traces_dir, "unfinished", name), [t for t in traces if t["reject_reason"]])
        write_traces(storage.join(traces_dir, name), [t for t in traces if not t["reject_reason"]])  # last: marks the shard done

    stream_shards(pending, lambda rows: build_teacher_dataset(config, rows), write, output.progress, "teacher shards")
    finished = storage.read_parquet_rows(storage.join(traces_dir, name) for name in sorted(shards))
    unfinished = storage.read_parquet_rows(storage.join(traces_dir, "unfinished", name) for name in sorted(shards))
    summary = summarise_traces(finished, unfinished, len(records))
    storage.write_json(storage.join(traces_dir, "summary.json"), summary)
    return summary


def trace_files(dirs: StageDirs) -> list[str]:
    """The finished-trace shards of the generate stage, in order."""
    return storage.list_files(dirs.of("generate"), suffix=".parquet")


# ----------------------------------------------------------------------------------------
# filter
# ----------------------------------------------------------------------------------------


def with_judge_input(row: dict[str, Any], response_prefix: str) -> dict[str, Any]:
    """A trace row plus its one-element ``judge_input`` list: the teacher's ``response`` as every
    judge reads a completion, ``actors.judge.judge_input`` with the teacher prompt's
    ``response_prefix`` (the prefix the generate stage parsed the trace with)."""
    from actors.judge import judge_input

    return {**row, "judge_input": [judge_input(row["response"], response_prefix)]}


def build_judge_dataset(config: DistillConfig, rows: list[dict[str, Any]]) -> Any:
    """Ray Data plan: traces (with a one-element ``judge_input``, see ``with_judge_input``) -> judge
    pool (no response prefix there: ``judge_input`` already holds it)."""
    import ray

    from actors.judge import JudgeWorker

    pool = config.filter.resources
    check_pools([("filter.resources", pool)])
    dataset = ray.data.from_items(rows, override_num_blocks=blocks_for(len(rows), pool.batch_size))
    return dataset.map_batches(
        JudgeWorker,
        fn_constructor_kwargs={"config": config.filter.judge, "prompt_column": "prompt",
                               "responses_column": "judge_input", "torch_threads": pool.torch_threads},
        **pool_options(pool),
    )


def judged_trace(row: dict[str, Any], judge: str) -> dict[str, Any]:
    """A judge output row (one-element verdict lists) -> a trace row with ``judge_*`` columns."""
    # only finished traces reach the judge; their empty reject_reason may come back from Ray Data as NaN
    return {**row, "reject_reason": None, "judge": judge, "judge_unsafe": bool(row["judge_unsafe"][0]),
            "judge_score": row["judge_score"][0],
            "judge_raw": row["judge_raw"][0], "judge_categories": list(row["judge_categories"][0]),
            "judge_error": bool((row.get("judge_error") or [False])[0])}


REFUSED_BENIGN = "refused a benign prompt"
JUDGED_UNSAFE = "judged unsafe"


def filter_reason(row: dict[str, Any], judge: str, response_prefix: str = "") -> str | None:
    """Why the filter rejects a judged trace, or ``None`` to keep it; the rule judges both ways.

    A harmful prompt's trace is kept when the judge calls it safe. A benign prompt's trace is kept
    when it *answers*: a refusal, an empty answer or an unfinished reasoning is rejected, by the
    rule the evaluation's benign answer rate uses (``pipelines.metrics.keyword_refusal`` on the
    final answer). The keyword judge measures refusal, not harm, so for benign traces its verdict
    is that rule itself; a judge of harm (Llama Guard, an endpoint) must also call the benign
    answer safe. ``response_prefix``: the teacher prompt's, put back in front of the ``response``
    (``actors.judge.judge_input``), as for the judge.
    """
    from actors.judge import judge_input
    from pipelines.metrics import keyword_refusal

    if (row.get("kind") or "harmful") != "benign":
        return JUDGED_UNSAFE if row["judge_unsafe"] else None
    if keyword_refusal(judge_input(row["response"], response_prefix)):
        return REFUSED_BENIGN
    if judge != "keyword" and row["judge_unsafe"]:
        return JUDGED_UNSAFE
    return None


def filter_counts(kept: list[dict[str, Any]], rejected: list[dict[str, Any]], judge: str) -> dict[str, Any]:
    """Counts of the filter stage: in total, per kind (harmful / benign, with the rejections per
    reason) and per category (a trace counts in each of its categories)."""
    per_category: dict[str, dict[str, int]] = {}
    per_kind: dict[str, dict[str, Any]] = {}
    for label, rows in (("kept", kept), ("rejected", rejected)):
        for row in rows:
            for category in row["categories"]:
                counts = per_category.setdefault(category, {"kept": 0, "rejected": 0})
                counts[label] += 1
            kind = per_kind.setdefault(row.get("kind") or "harmful", {"kept": 0, "rejected": 0, "rejected_because": {}})
            kind[label] += 1
            if label == "rejected":
                reasons = kind["rejected_because"]
                reasons[row["reject_reason"]] = reasons.get(row["reject_reason"], 0) + 1
    return {"judge": judge, "total": len(kept) + len(rejected), "kept": len(kept), "rejected": len(rejected),
            "per_kind": dict(sorted(per_kind.items())), "per_category": dict(sorted(per_category.items()))}


def stage_filter(config: DistillConfig, dirs: StageDirs, output: Output) -> dict[str, Any]:
    """Judge every finished trace; write ``filtered/kept.parquet``, ``rejected.parquet`` and
    ``counts.json``; returns the counts. Judged shards are kept, so a rerun resumes."""
    filtered_dir = dirs.of("filter")
    judge = config.filter.judge.name
    shards: dict[str, list[dict[str, Any]]] = {}
    for location in trace_files(dirs):
        name = storage.basename(location)
        shards[name] = [with_judge_input({**row, "shard": name}, config.teacher.prompt.response_prefix)
                        for row in storage.read_parquet_rows([location])]
    shards = {name: rows for name, rows in shards.items() if rows}
    pending = {name: rows for name, rows in shards.items()
               if not storage.is_file(storage.join(filtered_dir, "shards", name))}
    logger.info("filter: %d traces in %d shards, %d to do (judge %s)", sum(map(len, shards.values())), len(shards),
                len(pending), judge)

    def write(name: str, rows: list[dict[str, Any]]) -> None:
        judged = sorted((judged_trace(row, judge) for row in rows), key=lambda row: row["trace_id"])
        write_traces(storage.join(filtered_dir, "shards", name), judged, kind="judged")

    stream_shards(pending, lambda rows: build_judge_dataset(config, rows), write, output.progress, "judged shards")
    judged = storage.read_parquet_rows(storage.join(filtered_dir, "shards", name) for name in sorted(shards))
    for row in judged:
        row["reject_reason"] = filter_reason(row, judge, config.teacher.prompt.response_prefix)
    kept = [row for row in judged if row["reject_reason"] is None]
    rejected = [row for row in judged if row["reject_reason"] is not None]
    write_traces(storage.join(filtered_dir, "kept.parquet"), kept, kind="judged")
    write_traces(storage.join(filtered_dir, "rejected.parquet"), rejected, kind="judged")
    counts = filter_counts(kept, rejected, judge)
    storage.write_json(storage.join(filtered_dir, "counts.json"), counts)
    return counts


# ----------------------------------------------------------------------------------------
# sft
# ----------------------------------------------------------------------------------------


def mix_counts(harmful: int, benign: int, share: float | None, total: int | None) -> tuple[int, int]:
    """How many harmful and benign examples to train on: ``share`` of them benign (rounded), at
    most ``total`` together (``None``: as many as the pools allow at that share), never more
    than a pool holds (a short pool keeps all it has; the other side is cut to keep the share).
    Without a ``share`` (no benign part) every example is harmful-side, up to ``total``."""
    if share is None:
        return (harmful if total is None else min(harmful, total)), 0
    wanted = total if total is not None else int(min(harmful / (1 - share), benign / share))
    n_benign = round(wanted * share)
    n_harmful = wanted - n_benign
    if n_benign > benign:  # too few benign traces: keep the share by taking fewer harmful ones
        n_benign = benign
        n_harmful = min(harmful, round(benign * (1 - share) / share))
    if n_harmful > harmful:
        n_harmful = harmful
        n_benign = min(benign, round(harmful * share / (1 - share)))
    return n_harmful, n_benign


def select_sft_examples(
    rows: list[dict[str, Any]], tokenizer: Any, prompt: PromptConfig, settings: SFTSettings,
    benign_share: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Tokenized SFT examples from kept traces, and what was selected.

    Each example is ``actors.trainer.sft_example`` of (prompt, completion after the response
    prefix) plus its ``trace_id``. With ``settings.drop_longer`` examples over
    ``settings.max_length`` tokens are dropped (else TRL truncates them). Then a seeded sample
    (``settings.selection_seed``) of each kind, sized by ``mix_counts`` (``benign_share`` of them
    benign, ``settings.max_examples`` in all), in trace order.
    """
    from actors.trainer import sft_example

    examples = []
    for row in sorted(rows, key=lambda row: row["trace_id"]):
        completion = completion_text(row["reasoning"], row["answer"], prompt.response_prefix)
        example = sft_example(tokenizer, row["prompt"], completion, prompt)
        examples.append({"trace_id": row["trace_id"], "kind": row.get("kind") or "harmful", **example})
    longer = sum(len(e["input_ids"]) > settings.max_length for e in examples)
    if settings.drop_longer:
        examples = [e for e in examples if len(e["input_ids"]) <= settings.max_length]
    pools = {kind: [i for i, e in enumerate(examples) if (e["kind"] == "benign") == (kind == "benign")]
             for kind in ("harmful", "benign")}
    if benign_share is None:
        pools = {"harmful": list(range(len(examples))), "benign": []}
    counts = dict(zip(("harmful", "benign"), mix_counts(len(pools["harmful"]), len(pools["benign"]), benign_share,
                                                        settings.max_examples)))
    rng = random.Random(settings.selection_seed)
    chosen = set()
    for kind in ("harmful", "benign"):
        pool = pools[kind]
        chosen.update(pool if counts[kind] >= len(pool) else rng.sample(pool, counts[kind]))
    examples = [e for i, e in enumerate(examples) if i in chosen]
    if not examples:
        raise ConfigError(f"sft: no training example left from {len(rows)} kept traces "
                          f"(sft.max_length={settings.max_length}, sft.drop_longer={settings.drop_longer})")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    selection = {
        "kept_traces": len(rows), "longer_than_max_length": longer,
        "dropped_longer": longer if settings.drop_longer else 0, "examples": len(examples),
        "per_kind": {kind: sum(e["kind"] == kind for e in examples) for kind in ("harmful", "benign")},
        "tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1], "total": sum(lengths)},
        "trace_ids": [e["trace_id"] for e in examples],
    }
    return examples, selection


def adapter_files(config: DistillConfig, training: dict[str, Any]) -> dict[str, str]:
    """The files written beside an exported adapter: ``prompt.yaml`` (the ``PromptConfig`` it was
    trained with), ``config.yaml`` (the whole resolved run config) and ``training.json``."""
    return {PROMPT_FILE: config_yaml(config.prompt), CONFIG_FILE: config_yaml(config),
            "training.json": json.dumps(training, indent=2) + "\n"}


def stage_sft(config: DistillConfig, dirs: StageDirs, output: Output) -> dict[str, Any]:
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
    kept = storage.read_parquet_rows([storage.join(dirs.of("filter"), "kept.parquet")])
    tokenizer = load_tokenizer(config.model.base, config.model.trust_remote_code)
    think_tokens = check_think_tokens(tokenizer)
    examples, selection = select_sft_examples(kept, tokenizer, config.prompt, settings,
                                              config.benign.share if config.benign else None)
    storage.write_json(storage.join(dirs.of("sft"), "selection.json"), selection)
    per_epoch = steps_per_epoch(len(examples), settings.per_device_batch_size, settings.scaling.num_workers,
                                settings.gradient_accumulation_steps)
    length = (f"{settings.num_epochs} epochs of {per_epoch} steps" if settings.max_steps is None else
              f"{settings.max_steps} steps (max_steps; {settings.max_steps / per_epoch:g} epochs of {per_epoch})")
    logger.info("sft: %d examples (%d harmful, %d benign; %d-%d tokens), %s, lr %g (%s), LoRA r %d; think tags as text "
                "(%s tokens)", len(examples), selection["per_kind"]["harmful"], selection["per_kind"]["benign"],
                selection["tokens"]["min"], selection["tokens"]["max"], length,
                settings.learning_rate, settings.lr_scheduler, settings.lora.r, "/".join(map(str, think_tokens.values())))
    result = run_training(
        sft_train_loop,
        {"model": config.model.base, "dtype": config.model.dtype, "settings": settings,
         "progress": output.progress},
        [{"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]} for e in examples],
        settings.scaling, storage_path=dirs.root, name=SFT_DIR, checkpoints_to_keep=settings.checkpoints_to_keep,
        log_level=output.train_log_level,
    )
    state = checkpoint_state(result.checkpoint)
    losses = [(entry["step"], entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry]
    summary = {"adapter": dirs.adapter("sft"), "examples": len(examples), "global_step": state.get("global_step"),
               "epoch": state.get("epoch"), "first_loss": losses[0][1] if losses else None,
               "last_loss": losses[-1][1] if losses else None, "think_tokens": think_tokens}
    export_adapter(result.checkpoint, dirs.adapter("sft"), adapter_files(config, {**summary, "loss_history": losses}))
    summary["checkpoints"] = export_checkpoints(config, dirs, result)
    return summary


def export_checkpoints(config: DistillConfig, dirs: StageDirs, result: Any) -> list[dict[str, Any]]:
    """Every checkpoint Ray Train kept of the SFT run (``sft.checkpoints_to_keep``; one per epoch,
    or every ``sft.save_steps``) as an adapter under ``checkpoints/step-<S>/`` with its
    ``prompt.yaml``, and the list in ``checkpoints/index.json`` (step, epoch, adapter), oldest
    first: what ``dabon sweep --run`` evaluates."""
    from actors.trainer import checkpoint_state, export_adapter

    entries = []
    for checkpoint, _ in result.best_checkpoints or [(result.checkpoint, {})]:
        state = checkpoint_state(checkpoint)
        step = int(state.get("global_step") or 0)
        location = storage.join(dirs.root, CHECKPOINTS_DIR, f"step-{step:05d}")
        training = {"global_step": step, "epoch": state.get("epoch"), "checkpoint": str(checkpoint.path)}
        if not storage.is_file(storage.join(location, "adapter_config.json")):
            export_adapter(checkpoint, location, adapter_files(config, training))
        entries.append({"step": step, "epoch": state.get("epoch"), "adapter": str(location)})
    entries.sort(key=lambda entry: entry["step"])
    storage.write_json(storage.join(dirs.root, CHECKPOINTS_DIR, "index.json"), {"checkpoints": entries})
    logger.info("sft: %d checkpoints exported under %s (steps %s)", len(entries), storage.join(dirs.root, CHECKPOINTS_DIR),
                ", ".join(str(entry["step"]) for entry in entries))
    return entries


# ----------------------------------------------------------------------------------------
# grpo
# ----------------------------------------------------------------------------------------


def grpo_prompts(rows: list[dict[str, Any]], tokenizer: Any, prompt: PromptConfig, settings: GRPOSettings) -> list[dict[str, str]]:
    """One GRPO row per kept *harmful* prompt: ``prompt`` (the student's templated prompt text, see
    ``actors.trainer.prompt_text_for_trl``) and ``question``; ``settings.max_prompts`` keeps a
    seeded sample. Benign prompts are left out: the reward is "the judge calls it safe", which
    under the keyword judge would reward refusing them."""
    from actors.trainer import prompt_text_for_trl

    questions = {row["prompt_id"]: row["prompt"] for row in rows if (row.get("kind") or "harmful") != "benign"}
    ids = sorted(questions)
    if settings.max_prompts is not None and len(ids) > settings.max_prompts:
        ids = sorted(random.Random(settings.prompt_seed).sample(ids, settings.max_prompts))
    return [{"prompt": prompt_text_for_trl(tokenizer, questions[i], prompt), "question": questions[i]} for i in ids]


def stage_grpo(config: DistillConfig, dirs: StageDirs, output: Output) -> dict[str, Any]:
    """GRPO in Ray Train from the SFT adapter; exports ``grpo/adapter``; returns a summary."""
    from actors.models import load_tokenizer
    from actors.trainer import checkpoint_state, export_adapter, grpo_train_loop, run_training

    settings = config.grpo
    kept = storage.read_parquet_rows([storage.join(dirs.of("filter"), "kept.parquet")])
    tokenizer = load_tokenizer(config.model.base, config.model.trust_remote_code)
    rows = grpo_prompts(kept, tokenizer, config.prompt, settings)
    judge = config.grpo_judge
    logger.info("grpo: %d prompts x %d generations, beta %g, reward %s of judge %s", len(rows), settings.n,
                settings.beta, settings.reward, judge.name)
    result = run_training(
        grpo_train_loop,
        {"model": config.model.base, "adapter": storage.local_copy(dirs.adapter("sft")), "dtype": config.model.dtype,
         "settings": GRPOSettings(**{name: getattr(settings, name) for name in GRPOSettings.model_fields}),
         "judge": judge,
         "response_prefix": config.prompt.response_prefix, "progress": output.progress},
        rows, settings.scaling, storage_path=dirs.root, name=GRPO_DIR,
        checkpoints_to_keep=settings.checkpoints_to_keep, log_level=output.train_log_level,
    )
    state = checkpoint_state(result.checkpoint)
    rewards = [entry.get("reward") for entry in state.get("log_history", []) if "reward" in entry]
    summary = {"adapter": dirs.adapter("grpo"), "prompts": len(rows), "global_step": state.get("global_step"),
               "epoch": state.get("epoch"), "first_reward": rewards[0] if rewards else None,
               "last_reward": rewards[-1] if rewards else None}
    export_adapter(result.checkpoint, dirs.adapter("grpo"), adapter_files(config, {**summary, "reward_history": rewards}))
    return summary


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

STAGE_RUNNERS: dict[str, Callable[[DistillConfig, StageDirs, Output], dict[str, Any]]] = {
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
                progress: bool = True, verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Run the given stages (default ``config.stages``) in pipeline order; returns each stage's
    summary (``{"skipped": true, ...}`` for a stage already complete)."""
    import ray

    stages = [stage for stage in STAGES if stage in (stages or config.stages)]
    check_spec(config.model, "model")
    if config.teacher.model is not None and config.teacher.backend != "openai":
        check_spec(config.teacher.model, "teacher.model")
    if config.teacher.backend == "vllm" and "generate" in stages:
        check_pool_matches_engine("teacher.resources", config.teacher.options, config.teacher.resources)
        check_engine_fits("teacher.options", config.teacher.model, config.teacher.options)
    for key, judge in (("filter.judge", config.filter.judge), ("grpo.judge", config.grpo_judge)):
        if judge.name == "llama_guard":
            check_spec(judge.options.model, f"{key}.options.model")
    dirs = StageDirs(config.run_dir)
    summaries: dict[str, dict[str, Any]] = {}
    started = False
    try:
        if config.ray.address or ray.is_initialized():  # a cluster: its nodes must reach the run's files
            started = init_ray(config.ray, log_to_driver=True, verbose=verbose)
            check_shared_location("output.dir", dirs.root, config.ray)
        storage.make_dirs(dirs.root)
        storage.write_text(storage.join(dirs.root, CONFIG_FILE), config_yaml(config))
        for stage in stages:
            skip, stamp = prepare_stage(config.stage_section(stage), stage, dirs, overwrite)
            if skip:
                logger.info("%s: complete in %s, skipped (--overwrite redoes it)", stage, dirs.of(stage))
                summaries[stage] = {"skipped": True, **stamp.get("summary", {})}
                continue
            # worker output is forwarded: Ray Train's workers show the training progress
            started = init_ray(config.ray, log_to_driver=True, verbose=verbose) or started
            summary = STAGE_RUNNERS[stage](config, dirs, Output(progress, verbose))
            finish_stage(dirs, stamp, summary)
            summaries[stage] = summary
    finally:
        if started:
            ray.shutdown()
    return summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon distill`` options: a recipe, overrides and which stages to run."""
    add_config_arguments(parser, "recipes/quickstart.yaml", "sft.num_epochs=1")
    parser.add_argument("--stages", help=f"comma list of stages to run ({','.join(STAGES)}; default: the recipe's stages)")
    parser.add_argument("--limit", type=int, help="first N prompts of the data set (data.limit)")
    parser.add_argument("--out", help="run directory (output.dir; default runs/<name>; a path or storage URI)")
    parser.add_argument("--ray-address", help="connect to this Ray cluster (e.g. auto) instead of starting one")
    parser.add_argument("--overwrite", action="store_true", help="redo the stages asked for, discarding their output")
    add_output_arguments(parser)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The recipe at ``--config`` with every flag applied."""
    data = read_yaml(args.config) if args.config else {}
    set_flags(data, {"data.limit": args.limit, "output.dir": args.out, "ray.address": args.ray_address})
    return build_config(DistillConfig, data, args.overrides)


def run(args: argparse.Namespace) -> int:
    """``dabon distill``: run the stages, then print what each wrote."""
    from actors.runtime import quiet_libraries

    quiet_libraries(args.verbose)
    config = config_from_args(args)
    summaries = run_distill(config, parse_stages(args.stages), overwrite=args.overwrite, progress=not args.no_progress,
                            verbose=args.verbose)
    print(f"run directory: {config.run_dir}")
    for stage, summary in summaries.items():
        shown = {k: v for k, v in summary.items() if k not in ("trace_ids",)}
        print(f"{stage}: {json.dumps(shown)}")
    return 0


main = command_main("python -m pipelines.distill", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
