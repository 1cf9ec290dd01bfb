"""Evaluation: benchmark prompts -> N samples -> judge -> attribution scores -> shards -> metrics + report.

Launch::

    # local (a Ray started in-process), the CPU recipe on SmolLM2
    dabon evaluate --config recipes/quickstart-eval.yaml
    python -m pipelines.evaluate --config recipes/quickstart-eval.yaml --n 4 --layers 6,12
    # on a running cluster (the driver runs there; the working dir is shipped)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.evaluate --config recipes/quickstart-eval.yaml --ray-address auto

Ray Data streams the prompts through three actor pools (sampler, judge, scorer; sizes, CPUs
and GPUs per actor from the config). The driver collects rows by shard (a fixed, ordered slice
of each benchmark's prompts) and writes each shard as one Parquet file, atomically, once all of
its rows are in. A rerun with the same config skips the shards on disk, so an interrupted run
loses at most the shards in flight and never writes a prompt twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.models import EMBEDDED_ALIAS, ModelSpec
from actors.rows import to_plain
from actors.scorer import ScorerConfig, ScorerWorker
from actors.settings import get_logger
from pipelines.config import ConfigError, build_config, read_yaml, save_config

logger = get_logger(__name__)

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"


class StageResources(BaseModel):
    """An actor pool: ``min_actors``..``max_actors`` actors (elastic when they differ), each with
    ``num_cpus`` / ``num_gpus``, fed ``batch_size`` prompts at a time; ``torch_threads`` per actor."""

    model_config = ConfigDict(extra="forbid")

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=4, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> "StageResources":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class JudgeResources(StageResources):
    """The judge pool: the keyword judge is light, so half a CPU and bigger batches by default."""

    num_cpus: float = Field(default=0.5, ge=0)
    batch_size: int = Field(default=16, ge=1)


class Resources(BaseModel):
    """Actor pools of the three stages."""

    model_config = ConfigDict(extra="forbid")

    sampler: StageResources = StageResources()
    judge: JudgeResources = JudgeResources()
    scorer: StageResources = StageResources()


class EvalScoringConfig(ScorerConfig):
    """Scoring in an evaluation: every metric and a few layers by default (the report compares them).
    Prompt settings come from ``sampling``."""

    layers: tuple[int, ...] = (6, 12)
    metrics: tuple[str, ...] = ("latent_sim", "kl", "perplexity", "self_certainty")


class GeneratorConfig(BaseModel):
    """Which sampler backend generates (``hf`` in-process, ``vllm``, ``openai`` endpoint) and its options."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm", "openai"] = "hf"
    options: dict[str, Any] = {}


class JudgeConfig(BaseModel):
    """Which judge (``keyword``, ``llama_guard``, ``openai``) and its options."""

    model_config = ConfigDict(extra="forbid")

    name: str = "keyword"
    options: dict[str, Any] = {}


class RayConfig(BaseModel):
    """Where to run: ``address`` of a cluster (``auto``), or none for a local Ray in-process
    with ``num_cpus`` logical CPUs (default: max(4, cores + 2), so pools never hold every CPU)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int = Field(default=512, ge=64)


class OutputConfig(BaseModel):
    """Run directory and prompts per shard."""

    model_config = ConfigDict(extra="forbid")

    dir: str = "runs/eval"
    shard_size: int = Field(default=16, ge=1)


class ReportConfig(BaseModel):
    """Seed of random selection and bootstrap, bootstrap resamples, calibration split."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    bootstrap: int = Field(default=1000, ge=0)
    calibration_fraction: float = Field(default=0.3, gt=0, lt=1)
    calibration_benchmark: str | None = None


class EvalConfig(BaseModel):
    """One evaluation run (see ``recipes/quickstart-eval.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "eval"
    models: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS)
    benchmarks: list[dict[str, Any]] = [{"name": "star1", "star1_split": "dev"}]
    sampling: dict[str, Any] = {}
    generator: GeneratorConfig = GeneratorConfig()
    judge: JudgeConfig = JudgeConfig()
    scoring: EvalScoringConfig = EvalScoringConfig()
    resources: Resources = Resources()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _check_parts(self) -> "EvalConfig":
        from actors.sampler import SamplingConfig
        from pipelines.data import BenchmarkSpec

        # validate the sub-configs owned by other modules, with their own field names in errors
        SamplingConfig(**self.sampling)
        for spec in self.benchmarks:
            BenchmarkSpec(**spec)
        if not self.benchmarks:
            raise ValueError("benchmarks: expected at least one benchmark")
        if self.scoring.response_prefix is not None or self.scoring.system_prompt is not None:
            raise ValueError("scoring.response_prefix / scoring.system_prompt: set them under sampling; "
                             "the scorer always uses the sampler's, so both see the same prompt ids")
        return self

    @property
    def sampling_config(self) -> Any:
        from actors.sampler import SamplingConfig

        return SamplingConfig(**self.sampling)

    @property
    def benchmark_specs(self) -> list[Any]:
        from pipelines.data import BenchmarkSpec

        return [BenchmarkSpec(**spec) for spec in self.benchmarks]

    @property
    def scorer_config(self) -> ScorerConfig:
        """The scoring config with the sampler's prompt settings (same prompt ids everywhere)."""
        sampling = self.sampling_config
        return ScorerConfig(**{
            **self.scoring.model_dump(),
            "response_prefix": sampling.response_prefix, "system_prompt": sampling.system_prompt,
        })


# ----------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------


def shard_name(benchmark: str, index: int) -> str:
    """File name of a shard: ``<benchmark>-<index:05d>.parquet``."""
    return f"{benchmark}-{index:05d}.parquet"


def assign_shards(records: list[dict[str, Any]], shard_size: int) -> dict[str, list[dict[str, Any]]]:
    """Group records into shards of ``shard_size`` in their benchmark's order; refuse repeated ids."""
    shards: dict[str, list[dict[str, Any]]] = {}
    position: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for record in records:
        key = (record["benchmark"], record["prompt_id"])
        if key in seen:
            raise ValueError(f"benchmark {key[0]!r}: prompt_id {key[1]!r} appears twice")
        seen.add(key)
        index = position.get(record["benchmark"], 0)
        position[record["benchmark"]] = index + 1
        name = shard_name(record["benchmark"], index // shard_size)
        shards.setdefault(name, []).append({**record, "shard": name})
    return shards


def write_shard(samples_dir: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    """Write one shard atomically (temporary file, then rename), rows sorted by prompt_id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda row: row["prompt_id"])
    table = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "shard"} for row in rows])
    target = samples_dir / name
    temporary = samples_dir / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, target)
    return target



# ----------------------------------------------------------------------------------------
# The Ray Data pipeline
# ----------------------------------------------------------------------------------------


def _pool(resources: StageResources) -> Any:
    import ray

    if resources.min_actors == resources.max_actors:
        return ray.data.ActorPoolStrategy(size=resources.min_actors)
    return ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors)


def check_resources(config: EvalConfig, cluster: dict[str, float]) -> None:
    """Refuse pools that the cluster can never place (a GPU ask without GPUs hangs Ray Data)."""
    gpus = cluster.get("GPU", 0)
    for stage in ("sampler", "judge", "scorer"):
        wanted = getattr(config.resources, stage)
        if wanted.num_gpus > 0 and gpus == 0:
            raise ValueError(
                f"resources.{stage}.num_gpus={wanted.num_gpus}, but this Ray cluster has no GPUs; "
                "set it to 0 to run on CPUs or connect to a GPU cluster (--ray-address)"
            )


def build_dataset(config: EvalConfig, records: list[dict[str, Any]]) -> Any:
    """Ray Data plan: prompts -> sampler pool -> judge pool -> scorer pool (when fine-tuned)."""
    import ray

    sampling = config.sampling_config
    spec = config.models.model_dump()
    resources = config.resources
    from actors.judge import JudgeWorker
    from actors.sampler import SamplerWorker

    # one block per sampler batch, so every actor of the pool gets work (few blocks -> one busy actor)
    blocks = max(1, math.ceil(len(records) / resources.sampler.batch_size))
    dataset = ray.data.from_items(records, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        SamplerWorker,
        fn_constructor_kwargs={
            "spec": spec, "sampling": sampling.model_dump(), "backend": config.generator.backend,
            "backend_options": config.generator.options, "torch_threads": resources.sampler.torch_threads,
        },
        compute=_pool(resources.sampler),
        batch_size=resources.sampler.batch_size,
        num_cpus=resources.sampler.num_cpus,
        num_gpus=resources.sampler.num_gpus,
    )
    dataset = dataset.map_batches(
        JudgeWorker,
        fn_constructor_kwargs={
            "judge": config.judge.name, "options": config.judge.options, "response_prefix": sampling.response_prefix,
        },
        compute=_pool(resources.judge),
        batch_size=resources.judge.batch_size,
        num_cpus=resources.judge.num_cpus,
        num_gpus=resources.judge.num_gpus,
    )
    if config.models.has_finetuned:
        dataset = dataset.map_batches(
            ScorerWorker,
            fn_constructor_kwargs={
                "spec": spec, "config": config.scorer_config.model_dump(),
                "torch_threads": resources.scorer.torch_threads,
            },
            compute=_pool(resources.scorer),
            batch_size=resources.scorer.batch_size,
            num_cpus=resources.scorer.num_cpus,
            num_gpus=resources.scorer.num_gpus,
        )
    return dataset


def init_ray(ray_config: RayConfig, log_to_driver: bool = False) -> bool:
    """Connect to ``ray_config.address`` or start a local Ray in-process; True when started here.

    Workers get the repository on ``PYTHONPATH`` and the offline/cache environment variables.
    ``log_to_driver``: forward worker output (the distillation shows Ray Train's loss lines).
    """
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DABON_CACHE_DIR", "DABON_STAR1", "HF_HOME"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    repo = str(Path(__file__).resolve().parents[1])
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    if ray_config.address:
        ray.init(address=ray_config.address, runtime_env={"env_vars": env_vars}, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, in-process cluster
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=ray_config.num_cpus or max(4, (os.cpu_count() or 2) + 2),
            include_dashboard=False,
            object_store_memory=ray_config.object_store_mb * 1024 * 1024,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": env_vars},
        )
    return True


def prepare_run_dir(config: EvalConfig, overwrite: bool = False) -> Path:
    """Create the run directory; refuse to mix shards of a different config in it."""
    run_dir = Path(config.output.dir)
    saved = run_dir / CONFIG_FILE
    resolved = config.model_dump(mode="json")
    if saved.is_file() and not overwrite:
        previous = read_yaml(saved)
        if previous != resolved:
            changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            raise ConfigError(
                f"{run_dir} holds a run with a different config (differs in: {', '.join(changed)}); "
                "use another --out or pass --overwrite to start it again"
            )
    if overwrite and (run_dir / SAMPLES_DIR).is_dir():
        for old in (run_dir / SAMPLES_DIR).glob("*.parquet"):
            old.unlink()
    (run_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    save_config(config, saved)
    return run_dir


def run_evaluation(config: EvalConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) an evaluation and write shards, ``metrics.json``, ``report.md`` and plots.

    Returns the metrics dict.
    """
    import ray
    from tqdm import tqdm

    from pipelines.data import load_benchmark

    run_dir = prepare_run_dir(config, overwrite)
    samples_dir = run_dir / SAMPLES_DIR
    records = [record for spec in config.benchmark_specs for record in load_benchmark(spec)]
    shards = assign_shards(records, config.output.shard_size)
    pending = {name: rows for name, rows in shards.items() if not (samples_dir / name).is_file()}
    logger.info("%d prompts in %d shards; %d shards to do", len(records), len(shards), len(pending))
    if pending:
        started = init_ray(config.ray)
        try:
            check_resources(config, ray.cluster_resources())
            from ray.data import DataContext

            context = DataContext.get_current()
            context.enable_progress_bars = progress
            context.wait_for_min_actors_s = 600  # an unplaceable pool fails instead of hanging forever
            todo = [row for rows in pending.values() for row in rows]
            expected = {name: len(rows) for name, rows in pending.items()}
            collected: dict[str, list[dict[str, Any]]] = {name: [] for name in pending}
            dataset = build_dataset(config, todo)
            with tqdm(total=len(pending), unit="shard", desc="shards written", disable=not progress) as bar:
                for row in dataset.iter_rows():
                    row = to_plain(dict(row))
                    name = row["shard"]
                    collected[name].append(row)
                    if len(collected[name]) == expected[name]:
                        write_shard(samples_dir, name, collected.pop(name))
                        bar.update(1)
            if collected:
                missing = {name: expected[name] - len(rows) for name, rows in collected.items()}
                raise RuntimeError(f"the pipeline ended with incomplete shards: {missing}")
        finally:
            if started:
                ray.shutdown()
    return build_report(run_dir, config)


def build_report(run_dir: Path, config: EvalConfig) -> dict[str, Any]:
    """Metrics and report from the shards in ``run_dir``."""
    from pipelines import report

    rows = report.load_shards(run_dir)
    metrics = report.compute_metrics(
        rows,
        layers=list(config.scoring.layers) if config.models.has_finetuned else [],
        seed=config.report.seed,
        bootstrap=config.report.bootstrap,
        calibration={"fraction": config.report.calibration_fraction, "benchmark": config.report.calibration_benchmark},
        is_refusal=report.keyword_refusal,
    )
    report.write_report(run_dir, metrics, rows)
    return metrics


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon evaluate`` options: a recipe plus overrides."""
    parser.add_argument("--config", type=Path, help="YAML recipe (e.g. recipes/quickstart-eval.yaml); defaults apply without one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key with a dotted path, e.g. --set sampling.top_p=0.95 (repeatable)")
    parser.add_argument("--prompts", type=Path, help="a JSONL/CSV/Parquet file of prompts (replaces the recipe's benchmarks)")
    parser.add_argument("--prompt-column", default="prompt", help="column of --prompts holding the prompt (default prompt)")
    parser.add_argument("--id-column", help="column of --prompts holding a unique prompt id (default: <file stem>-<row>)")
    parser.add_argument("--benchmark", help="a benchmark name (replaces the recipe's benchmarks): "
                        "strongreject, dan, wildjailbreak, gsm8k, mmlu, star1")
    parser.add_argument("--base", help="base model: alias, local dir, .gguf or Hub id")
    parser.add_argument("--adapter", help="LoRA adapter of the fine-tuned student (none: evaluate the base alone)")
    parser.add_argument("--n", type=int, help="samples per prompt")
    parser.add_argument("--layers", help="layers for latent similarity, e.g. 6,12")
    parser.add_argument("--judge", help="judge: keyword, llama_guard or openai")
    parser.add_argument("--max-new-tokens", type=int, help="max new tokens per sample")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling and report seed")
    parser.add_argument("--limit", type=int, help="first N prompts of each benchmark")
    parser.add_argument("--out", help="run directory (default from the recipe)")
    parser.add_argument("--ray-address", help="connect to this Ray cluster (e.g. auto) instead of starting one")
    parser.add_argument("--overwrite", action="store_true", help="discard shards of an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The recipe at ``--config`` with every flag applied as an override."""
    data = read_yaml(args.config) if args.config else {}
    overrides = list(args.overrides)
    if args.prompts:
        data["benchmarks"] = [{"name": "file", "path": str(args.prompts), "prompt_column": args.prompt_column}]
        if args.id_column:
            data["benchmarks"][0]["id_column"] = args.id_column
    elif args.benchmark:
        data["benchmarks"] = [{"name": args.benchmark}]
    if args.limit is not None:
        data["benchmarks"] = [{**spec, "limit": args.limit} for spec in data.get("benchmarks", EvalConfig().benchmarks)]
    pairs = {
        "models.base": args.base, "models.adapter": args.adapter, "sampling.n": args.n,
        "judge.name": args.judge, "sampling.max_new_tokens": args.max_new_tokens,
        "sampling.temperature": args.temperature, "sampling.seed": args.seed, "report.seed": args.seed,
        "output.dir": args.out, "ray.address": args.ray_address,
    }
    overrides += [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]
    if args.layers:
        from pipelines.score import parse_int_list

        overrides.append(f"scoring.layers={json.dumps(list(parse_int_list(args.layers, '--layers')))}")
    return build_config(EvalConfig, data, overrides)


def run(args: argparse.Namespace) -> int:
    """``dabon evaluate``: run, then print where the report is."""
    config = config_from_args(args)
    metrics = run_evaluation(config, overwrite=args.overwrite, progress=not args.no_progress)
    run_dir = Path(config.output.dir)
    print(f"report: {run_dir / 'report.md'}  metrics: {run_dir / 'metrics.json'}")
    for name, bench in metrics.get("benchmarks", {}).items():
        asr = bench.get("asr", {})
        if asr:
            print(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in asr.items() if value is not None))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.evaluate``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    from pipelines.cli import run_guarded

    return run_guarded(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
