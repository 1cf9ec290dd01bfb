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
loses at most the shards in flight and never writes a prompt twice. The resolved config (every
default included) is saved as ``config.yaml``; a rerun with a different one is refused. What the
loaders kept of each benchmark, and how many prompts ``max_prompt_chars`` dropped, is saved as
``prompts.json`` (``pipelines.data.write_prompt_counts``) and shown in the report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from actors import storage
from actors.chat import resolve_prompt
from actors.config import ConfigError, build_config, changed_keys, config_yaml, read_yaml
from actors.models import check_scorable, check_spec
from actors.runtime import (
    assign_shards,
    blocks_for,
    check_pools,
    check_shared_location,
    init_ray,
    pool_options,
    stream_shards,
)
from actors.vllm_engine import add_vllm_sampling, check_engine_fits, check_pool_matches_engine
from actors.settings import get_logger
from pipelines.args import add_config_arguments, add_output_arguments, command_main, parse_int_list, set_flags
from pipelines.eval_config import CONFIG_FILE, SAMPLES_DIR, EvalConfig, EvalScoringConfig, OutputConfig, Resources

__all__ = ["EvalConfig", "EvalScoringConfig", "OutputConfig", "Resources", "run_evaluation", "build_dataset"]

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------
# The Ray Data pipeline
# ----------------------------------------------------------------------------------------


def build_dataset(config: EvalConfig, records: list[dict[str, Any]]) -> Any:
    """Ray Data plan: prompts -> sampler pool -> judge pool (-> refusal judge, when set) -> scorer
    pool (when fine-tuned)."""
    import ray

    from actors.judge import JudgeWorker, RefusalWorker
    from actors.sampler import SamplerWorker
    from actors.scorer import ScorerWorker

    resources = config.resources
    dataset = ray.data.from_items(records, override_num_blocks=blocks_for(len(records), resources.sampler.batch_size))
    if config.generator.backend == "vllm":  # Ray Data's LLM processor: one engine per sampler actor
        dataset = add_vllm_sampling(dataset, config.model, config.prompt, config.sampling, config.generator.options,
                                    resources.sampler)
    else:
        dataset = dataset.map_batches(
            SamplerWorker,
            fn_constructor_kwargs={"spec": config.model, "sampling": config.sampling, "prompt": config.prompt,
                                   "generator": config.generator, "torch_threads": resources.sampler.torch_threads},
            **pool_options(resources.sampler),
        )
    dataset = dataset.map_batches(
        JudgeWorker,
        fn_constructor_kwargs={"config": config.judge, "response_prefix": config.prompt.response_prefix,
                               "torch_threads": resources.judge.torch_threads},
        **pool_options(resources.judge),
    )
    if config.refusal_judge is not None:  # benign rows: refused per sample, read by the report
        dataset = dataset.map_batches(
            RefusalWorker,
            fn_constructor_kwargs={"config": config.refusal_judge, "response_prefix": config.prompt.response_prefix,
                                   "torch_threads": resources.judge.torch_threads},
            **pool_options(resources.judge),
        )
    if config.model.has_finetuned:
        dataset = dataset.map_batches(
            ScorerWorker,
            fn_constructor_kwargs={"spec": config.model, "config": config.scoring, "prompt": config.prompt,
                                   "torch_threads": resources.scorer.torch_threads},
            **pool_options(resources.scorer),
        )
    return dataset


def prompt_records(config: EvalConfig) -> tuple[list[dict[str, Any]], list[Any]]:
    """The prompts of every benchmark, with ``reference`` as text (``None`` where a benchmark has
    none), so that rows of different benchmarks share one schema in Ray Data; and each
    benchmark's ``pipelines.data.PromptCounts`` (prompts kept, and dropped by ``max_prompt_chars``)."""
    from pipelines.data import load_benchmark

    loaded = [load_benchmark(spec) for spec in config.benchmarks]
    records = [record for batch in loaded for record in batch]
    for record in records:
        record["reference"] = None if record.get("reference") is None else str(record["reference"])
    return records, [batch.counts for batch in loaded]


def prepare_run_dir(config: EvalConfig, overwrite: bool = False) -> str:
    """Create the run directory; refuse to mix shards of a different config in it."""
    run_dir = config.output.dir
    saved = storage.join(run_dir, CONFIG_FILE)
    resolved = config.model_dump(mode="json")
    if storage.is_file(saved) and not overwrite:
        import yaml

        previous = yaml.safe_load(storage.read_text(saved)) or {}
        changed = changed_keys(previous, resolved)  # a setting added since, null by default, reads as absent
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different config (differs in: {', '.join(changed)}); "
                "use another --out or pass --overwrite to start it again"
            )
    if overwrite:
        storage.remove(storage.join(run_dir, SAMPLES_DIR))
    storage.make_dirs(storage.join(run_dir, SAMPLES_DIR))
    storage.write_text(saved, config_yaml(config))
    return run_dir


def run_evaluation(config: EvalConfig, overwrite: bool = False, progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) an evaluation and write shards, ``metrics.json``, ``report.md`` and plots.

    Returns the metrics dict.
    """
    import ray

    from pipelines.data import write_prompt_counts
    from pipelines.report import build_report

    check_spec(config.model, "model")
    if config.model.has_finetuned:  # the scorer runs: refuse a model it cannot score exactly, before any work
        check_scorable(config.model, "model")
    if config.judge.name == "llama_guard":
        check_spec(config.judge.options.model, "judge.options.model")
    if config.refusal_judge is not None and config.refusal_judge.name == "model":
        check_spec(config.refusal_judge.options.model, "refusal_judge.options.model")
    if config.generator.backend == "vllm":
        check_pool_matches_engine("resources.sampler", config.generator.options, config.resources.sampler)
        check_engine_fits("generator.options", config.model, config.generator.options)
    started = False
    try:
        if config.ray.address or ray.is_initialized():  # a cluster: its nodes must reach the run's files
            started = init_ray(config.ray, log_to_driver=verbose, verbose=verbose)
            check_shared_location("output.dir", config.output.dir, config.ray)
            check_shared_location("model.adapter", config.model.adapter, config.ray)
        run_dir = prepare_run_dir(config, overwrite)
        samples_dir = storage.join(run_dir, SAMPLES_DIR)
        records, counts = prompt_records(config)
        write_prompt_counts(run_dir, counts)  # the report shows what max_prompt_chars dropped
        shards = assign_shards(records, config.output.shard_size)
        pending = {name: rows for name, rows in shards.items() if not storage.is_file(storage.join(samples_dir, name))}
        logger.info("%d prompts in %d shards; %d shards to do", len(records), len(shards), len(pending))
        if pending:
            started = init_ray(config.ray, log_to_driver=verbose, verbose=verbose) or started
            stages = [("resources.sampler", config.resources.sampler), ("resources.judge", config.resources.judge)]
            if config.model.has_finetuned:
                stages.append(("resources.scorer", config.resources.scorer))
            check_pools(stages)

            def write(name: str, rows: list[dict[str, Any]]) -> None:
                rows = sorted(({k: v for k, v in row.items() if k != "shard"} for row in rows), key=lambda r: r["prompt_id"])
                storage.write_parquet(storage.join(samples_dir, name), rows)

            stream_shards(pending, lambda rows: build_dataset(config, rows), write, progress, "shards written")
    finally:
        if started:
            ray.shutdown()
    return build_report(run_dir, config.scored_layers, config.report, prompt=config.prompt,
                        adapter=config.model.adapter, judge=config.judge)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon evaluate`` options: a recipe plus overrides."""
    add_config_arguments(parser, "recipes/quickstart-eval.yaml", "sampling.top_p=0.95")
    parser.add_argument("--prompts", help="a JSONL/CSV/TSV/Parquet file of prompts (replaces the recipe's benchmarks)")
    parser.add_argument("--prompt-column", default="prompt", help="column of --prompts holding the prompt (default prompt)")
    parser.add_argument("--id-column", help="column of --prompts holding a unique prompt id (default: <file stem>-<row>)")
    parser.add_argument("--benchmark", help="a benchmark name (replaces the recipe's benchmarks): "
                        "strongreject, dan, wildjailbreak, gsm8k, mmlu, star1, star1_benign, xstest, or_bench, jailbreakbench")
    parser.add_argument("--base", help="base model: alias, local dir, .gguf or Hub id")
    parser.add_argument("--adapter", help="LoRA adapter of the fine-tuned student (none: evaluate the base alone)")
    parser.add_argument("--n", type=int, help="samples per prompt")
    parser.add_argument("--layers", help="layers for latent similarity, e.g. 6,12")
    parser.add_argument("--judge", help="judge: keyword, llama_guard or openai")
    parser.add_argument("--max-new-tokens", type=int, help="max new tokens per sample")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--seed", type=int, help="sampling and report seed")
    parser.add_argument("--limit", type=int, help="first N prompts of each benchmark")
    parser.add_argument("--out", help="run directory (default from the recipe; a path or storage URI)")
    parser.add_argument("--ray-address", help="connect to this Ray cluster (e.g. auto) instead of starting one")
    parser.add_argument("--overwrite", action="store_true", help="discard shards of an earlier run in --out")
    add_output_arguments(parser)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The recipe at ``--config`` with every flag applied."""
    data = read_yaml(args.config) if args.config else {}
    if args.prompts:
        spec = {"name": "file", "path": args.prompts, "prompt_column": args.prompt_column}
        data["benchmarks"] = [{**spec, "id_column": args.id_column} if args.id_column else spec]
    elif args.benchmark:
        data["benchmarks"] = [{"name": args.benchmark}]
    if args.limit is not None:
        default = [spec.model_dump(exclude_defaults=True) for spec in EvalConfig.model_fields["benchmarks"].default]
        data["benchmarks"] = [{**spec, "limit": args.limit} for spec in data.get("benchmarks", default)]
    if args.judge is not None and (data.get("judge") or {}).get("name") != args.judge:
        data["judge"] = {"name": args.judge}  # another judge's options do not carry over
    set_flags(data, {
        "model.base": args.base, "model.adapter": args.adapter, "sampling.n": args.n,
        "sampling.max_new_tokens": args.max_new_tokens,
        "sampling.temperature": args.temperature, "sampling.seed": args.seed, "report.seed": args.seed,
        "output.dir": args.out, "ray.address": args.ray_address,
        "scoring.layers": parse_int_list(args.layers, "--layers") if args.layers else None,
    })
    return with_adapter_prompt(build_config(EvalConfig, data, args.overrides), prompt_given(data, args.overrides))


def prompt_given(data: dict[str, Any], overrides: list[str] | None) -> bool:
    """Whether a recipe mapping or its ``--set`` overrides give a ``prompt`` section."""
    return "prompt" in data or any(str(item).split("=", 1)[0].strip().split(".")[0] == "prompt" for item in overrides or [])


def with_adapter_prompt(config: EvalConfig, given: bool) -> EvalConfig:
    """``config`` with the adapter's ``prompt.yaml`` as its prompt when the recipe gave none
    (``actors.chat.resolve_prompt``); logs where the prompt came from."""
    prompt, source = resolve_prompt(config.prompt if given else None, config.model.adapter)
    (logger.warning if "differs" in source else logger.info)("prompt: %s", source)
    return config if prompt == config.prompt else config.model_copy(update={"prompt": prompt})


def run(args: argparse.Namespace) -> int:
    """``dabon evaluate``: run, then print where the report is."""
    from actors.runtime import quiet_libraries

    quiet_libraries(args.verbose)
    config = config_from_args(args)
    metrics = run_evaluation(config, overwrite=args.overwrite, progress=not args.no_progress, verbose=args.verbose)
    run_dir = config.output.dir
    print(f"report: {storage.join(run_dir, 'report.md')}  metrics: {storage.join(run_dir, 'metrics.json')}")
    for name, bench in metrics.get("benchmarks", {}).items():
        asr = bench.get("asr", {})
        if asr:
            print(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in asr.items() if value is not None))
    return 0


main = command_main("python -m pipelines.evaluate", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
