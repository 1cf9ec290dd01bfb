"""vLLM as the sampling engine of a Ray Data pipeline (evaluation samples, teacher traces), and
the engine arithmetic that sizes it for a cluster.

The stage (``add_vllm_sampling``) is Ray Data's own LLM processor
(``ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))``), fed token ids that
``actors.chat`` built, so the engine generates from exactly the prompt the HF scorer later reads::

    prompts ──PromptEncoder──▶ prompt_ids ──expand──▶ one row per (prompt, sample), each with its
    own seed ──vLLM engine (LoRA by the row's ``model``)──▶ generated ids ──SampleCollector──▶ one
    row per prompt with ``responses``, ``response_ids``, ``finish_reasons``, ``sample_errors``

- Seeds: sample ``i`` of prompt ``p`` gets ``sample_seed(run seed, p, i)``, a hash, so no two
  prompts share a random stream (vLLM's own ``n`` would give sample ``i`` the seed ``seed + i``,
  which the next prompt's sample ``i - 1`` also draws from) and results do not depend on batching.
- Ray 2.60's vLLM stage keeps only the first completion of a request and no finish reason: one
  request per sample, and ``finish_reason`` is ``"stop"`` when the engine ended the sample on a
  stop id (the id is dropped from ``response_ids``), else ``"length"``.
- Rows the engine fails on (``should_continue_on_error``) come back with ``__inference_error__``;
  they are kept, marked ``"error"`` in ``finish_reasons`` and named in ``sample_errors``, and the
  report counts them; nothing is dropped silently.
- Placement: on a CPU cluster one CPU bundle per engine; on GPUs ``tensor_parallel_size x
  pipeline_parallel_size`` GPU bundles, which Ray Data LLM packs into one placement group per
  engine replica (``placement_bundles``), tagged with the ``accelerator_type`` when given.
- ``check_engine_fits``: bf16 weights of a 14B model (~28 GiB) do not fit a 24 GiB GPU; the
  arithmetic refuses such a recipe before any GPU is asked for, naming the field to change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from actors.config import ConfigError, PoolConfig, PromptConfig
from actors.models import ModelLoadError, ModelSpec, local_model_dir
from actors.rows import to_plain
from actors.sampler import SamplingConfig, VLLMOptions, sample_seed, vllm_sampling_kwargs
from actors.settings import get_logger, hub_offline

logger = get_logger(__name__)

# Memory the prompt-encoding actor asks Ray for: a tokenizer and a batch of prompts.
TOKENIZER_ACTOR_MEMORY = 512 * 1024 * 1024

# GPU memory of the accelerator types Ray names (ray.util.accelerators), in GiB.
ACCELERATOR_MEMORY_GIB: dict[str, float] = {
    "T4": 16, "L4": 24, "A10G": 24, "L40S": 48, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Room an engine needs on each GPU beyond weights and one sequence's KV cache: CUDA context,
# activations of a batch, sampler buffers. An estimate: vLLM profiles the real number at start.
ENGINE_OVERHEAD_GIB = 1.5
GIB = 1024**3


# ----------------------------------------------------------------------------------------
# Engine arithmetic
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """Memory of one engine replica per GPU: weights, one ``max_model_len`` sequence of KV
    cache, a fixed overhead, and the budget ``gpu_memory_utilization x`` GPU memory."""

    parameters: int
    dtype: str
    gpus: int
    weights_gib: float
    kv_gib: float
    overhead_gib: float
    budget_gib: float | None

    @property
    def needed_gib(self) -> float:
        """GiB one GPU of the replica must hold."""
        return self.weights_gib + self.kv_gib + self.overhead_gib

    @property
    def fits(self) -> bool | None:
        """Whether it fits (``None`` when the GPU memory is unknown)."""
        return None if self.budget_gib is None else self.needed_gib <= self.budget_gib


def model_parameters(config: dict[str, Any]) -> int:
    """Parameter count of a decoder-only transformer from its HF ``config.json`` mapping
    (embeddings, attention with grouped KV heads, a gated MLP, norms; biases left out)."""
    text = config.get("text_config") or config
    hidden = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    intermediate = int(text["intermediate_size"])
    vocab = int(text["vocab_size"])
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """KV cache bytes of one token (keys and values of every layer)."""
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    return 2 * int(text["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes


def engine_dtype(options: VLLMOptions, spec: ModelSpec, config: dict[str, Any]) -> str:
    """The dtype the engine runs in: the options', the spec's, else the checkpoint's (bf16 default)."""
    for choice in (options.dtype, spec.dtype):
        if choice and choice != "auto":
            return choice
    stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    return stored if stored in DTYPE_BYTES else "bfloat16"


def engine_plan(config: dict[str, Any], options: VLLMOptions, dtype: str) -> EnginePlan:
    """The ``EnginePlan`` of a model (its ``config.json`` mapping) under ``options``."""
    gpus = options.tensor_parallel_size * options.pipeline_parallel_size
    width = DTYPE_BYTES[dtype]
    parameters = model_parameters(config)
    text = config.get("text_config") or config
    context = options.max_model_len or int(text.get("max_position_embeddings") or 4096)
    memory = ACCELERATOR_MEMORY_GIB.get(options.accelerator_type or "")
    return EnginePlan(
        parameters=parameters, dtype=dtype, gpus=gpus,
        weights_gib=parameters * width / gpus / GIB,
        kv_gib=kv_bytes_per_token(config, width) * context / gpus / GIB,
        overhead_gib=ENGINE_OVERHEAD_GIB,
        budget_gib=None if memory is None else memory * options.gpu_memory_utilization,
    )


def read_model_config(name: str, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """The ``config.json`` of a model as a mapping (local dir, GGUF alias or Hub id), or ``None``
    when it cannot be read here (offline and not cached)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(local_model_dir(name), local_files_only=hub_offline(),
                                          trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError, ModelLoadError) as err:
        logger.warning("config of %s unreadable here (%s); its engine size is not checked", name, err)
        return None


def check_engine_fits(key: str, spec: ModelSpec, options: VLLMOptions, config: dict[str, Any] | None = None) -> EnginePlan | None:
    """Refuse an engine that cannot fit its GPUs; errors name ``key`` (the options' config key).

    Returns the plan (``None`` when the model's config cannot be read or no GPU is asked for).
    """
    if options.accelerator_type is None and options.tensor_parallel_size * options.pipeline_parallel_size == 1:
        return None  # no GPU type to size against (a CPU engine, or the cluster's default GPU)
    config = config if config is not None else read_model_config(spec.finetuned or spec.base, spec.trust_remote_code)
    if config is None:
        return None
    plan = engine_plan(config, options, engine_dtype(options, spec, config))
    if plan.fits is False:
        raise ConfigError(
            f"{key}.tensor_parallel_size: {spec.finetuned or spec.base} ({plan.parameters / 1e9:.1f}B parameters, "
            f"{plan.dtype}) needs about {plan.needed_gib:.1f} GiB per GPU with tensor_parallel_size="
            f"{options.tensor_parallel_size} and pipeline_parallel_size={options.pipeline_parallel_size} "
            f"({plan.weights_gib:.1f} GiB of weights, {plan.kv_gib:.1f} GiB of KV cache for one "
            f"{options.max_model_len or 'max-length'}-token sequence, {plan.overhead_gib} GiB overhead), but a "
            f"{options.accelerator_type} gives {plan.budget_gib:.1f} GiB (gpu_memory_utilization "
            f"{options.gpu_memory_utilization}); raise tensor_parallel_size or pick a larger accelerator_type"
        )
    return plan


def placement_bundles(options: VLLMOptions, pool: PoolConfig) -> list[dict[str, float]]:
    """The placement group bundles of one engine replica: ``tensor_parallel_size x
    pipeline_parallel_size`` bundles of one GPU each (and the pool's CPUs per GPU) on a GPU pool,
    one bundle of the pool's CPUs on a CPU pool. Ray Data LLM adds the accelerator label."""
    gpus = options.tensor_parallel_size * options.pipeline_parallel_size
    if pool.num_gpus == 0:
        if gpus != 1:
            raise ConfigError("generator.options.tensor_parallel_size: tensor and pipeline parallelism need GPUs; "
                              "set the pool's num_gpus to tensor_parallel_size x pipeline_parallel_size")
        return [{"CPU": max(pool.num_cpus, 1.0)}]
    return [{"GPU": 1.0, "CPU": max(pool.num_cpus / gpus, 1.0)} for _ in range(gpus)]


def check_pool_matches_engine(key: str, options: VLLMOptions, pool: PoolConfig) -> None:
    """A GPU pool must give each engine exactly ``tensor_parallel_size x pipeline_parallel_size`` GPUs."""
    gpus = options.tensor_parallel_size * options.pipeline_parallel_size
    if pool.label_selector:
        raise ConfigError(f"{key}.label_selector: vLLM engines are placed by placement groups, which take no label "
                          "selector; name the GPU type in the generator's accelerator_type instead")
    if pool.num_gpus and pool.num_gpus != gpus:
        raise ConfigError(f"{key}.num_gpus: {pool.num_gpus:g} GPU(s) per engine, but tensor_parallel_size x "
                          f"pipeline_parallel_size = {gpus}; set num_gpus to {gpus} (or 0 for a CPU engine)")


# ----------------------------------------------------------------------------------------
# The Ray Data stage
# ----------------------------------------------------------------------------------------

# The vLLM stage reads a text ``prompt`` column (and fails on chat messages); ours travels aside.
PROMPT_CARRY = "dabon_prompt"
# One row per (prompt, sample) carries these; the collector drops them again.
SAMPLE_COLUMNS = ("sample_index", "sample_key", "seed", "response", "response_ids_one", "finish_reason", "sample_error",
                  "__inference_error__")
# What the vLLM stage adds or reads (dropped by the postprocess).
ENGINE_COLUMNS = (
    "tokenized_prompt", "sampling_params", "prompt_token_ids", "num_input_tokens", "generated_tokens",
    "generated_text", "num_generated_tokens", "metrics", "embeddings", "logprobs", "prompt_logprobs",
    "time_taken_llm", "params", "model", "request_id", "batch_uuid", "prompt", "__inference_error__",
)


def expand_samples(row: dict[str, Any], n: int, run_seed: int, id_column: str = "prompt_id") -> list[dict[str, Any]]:
    """One row per sample of a prompt row (``Dataset.flat_map``): ``sample_index`` 0..n-1 and the
    sample's ``seed`` from ``sample_seed(run_seed, row[id_column], index)``."""
    key = json.dumps([str(row.get("benchmark", "")), str(row[id_column])])
    return [{**row, "sample_index": index, "sample_key": key, "seed": sample_seed(run_seed, row[id_column], index)}
            for index in range(n)]


def engine_preprocess(row: dict[str, Any], config: SamplingConfig, model: str) -> dict[str, Any]:
    """A sample row -> the vLLM stage's request: ``tokenized_prompt`` (the ``prompt_ids``),
    ``sampling_params`` and ``model`` (the adapter to apply, or the base model)."""
    out = {key: value for key, value in row.items() if key not in ("prompt", "seed")}
    if "prompt" in row:
        out[PROMPT_CARRY] = row["prompt"]
    out.update(tokenized_prompt=[int(t) for t in to_plain(row["prompt_ids"])],
               sampling_params=vllm_sampling_kwargs(config, int(row["seed"])), model=model)
    return out


def engine_postprocess(row: dict[str, Any], stop_ids: Sequence[int]) -> dict[str, Any]:
    """The vLLM stage's answer -> ``response`` (the engine's text), ``response_ids_one`` (its
    token ids, a trailing stop id dropped), ``finish_reason`` (``stop`` when a stop id ended it,
    else ``length``; ``error`` for a failed request) and ``sample_error``."""
    error = row.get("__inference_error__")
    generated = [int(t) for t in (to_plain(row.get("generated_tokens")) or [])]
    stopped = bool(generated) and generated[-1] in set(stop_ids)
    out = {key: value for key, value in row.items() if key not in ENGINE_COLUMNS and key != PROMPT_CARRY}
    if PROMPT_CARRY in row:
        out["prompt"] = row[PROMPT_CARRY]
    if error:
        out.update(response="", response_ids_one=[], finish_reason="error", sample_error=str(error))
    else:
        out.update(response=str(row.get("generated_text") or ""), response_ids_one=generated[:-1] if stopped else generated,
                   finish_reason="stop" if stopped else "length", sample_error="")
    return out


class SampleCollector:
    """``map_batches`` callable class (one actor) that gathers the N sample rows of each prompt
    and emits the prompt's row once all N are in: the prompt's columns plus N-lists
    ``responses``, ``response_ids``, ``finish_reasons`` and ``sample_errors``, by sample index.
    Rows of a prompt that is not complete yet stay buffered (a second copy of a sample, from a
    retried engine batch, is dropped). Rows the engine failed on skip the processor's
    postprocess, so they are converted here (``engine_postprocess`` on the raw row)."""

    def __init__(self, n: int, stop_ids: Sequence[int]) -> None:
        self.n = n
        self.stop_ids = list(stop_ids)
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        columns = list(batch)
        rows = [{key: to_plain(batch[key][i]) for key in columns} for i in range(len(batch[columns[0]]))] if columns else []
        done = []
        for row in rows:
            if row.get("finish_reason") is None or row.get("__inference_error__"):
                row = engine_postprocess(row, self.stop_ids)
            else:  # columns of failed rows that Ray Data added to the block as nulls
                row = {k: v for k, v in row.items() if (k not in ENGINE_COLUMNS or k == "prompt") and k != PROMPT_CARRY}
            samples = self.pending.setdefault(row["sample_key"], {})
            samples.setdefault(int(row["sample_index"]), row)
            if len(samples) == self.n:
                ordered = [samples[i] for i in range(self.n)]
                del self.pending[row["sample_key"]]
                first = {key: value for key, value in ordered[0].items() if key not in SAMPLE_COLUMNS}
                first.update(responses=[s["response"] for s in ordered],
                             response_ids=[s["response_ids_one"] for s in ordered],
                             finish_reasons=[s["finish_reason"] for s in ordered],
                             sample_errors=[s["sample_error"] for s in ordered])
                done.append(first)
        keys = list(done[0]) if done else []
        return {key: [row[key] for row in done] for key in keys}


def adapter_source(spec: ModelSpec) -> tuple[str | None, str | None]:
    """``(model column value, dynamic LoRA root)`` for the spec's adapter: a local adapter is
    named by its absolute path; one on storage (``s3://.../adapter``) by its directory name under
    a root vLLM downloads from. ``(None, None)`` without an adapter."""
    from actors import storage

    if not spec.adapter:
        return None, None
    if storage.is_uri(spec.adapter) and not storage.is_local(spec.adapter):
        base, _, name = spec.adapter.rstrip("/").rpartition("/")
        return name, base
    return str(Path(storage.filesystem(spec.adapter)[1]).resolve()), None


def add_vllm_sampling(
    dataset: Any,
    spec: ModelSpec,
    prompt: PromptConfig,
    sampling: SamplingConfig,
    options: VLLMOptions,
    pool: PoolConfig,
    *,
    prompt_column: str = "prompt",
    id_column: str = "prompt_id",
    env_vars: dict[str, str] | None = None,
) -> Any:
    """``dataset`` (one row per prompt) sampled N times per prompt by vLLM (see module doc);
    returns one row per prompt with ``prompt_ids``, ``responses``, ``response_ids``,
    ``finish_reasons`` and ``sample_errors``. ``pool``: engine replicas (``min_actors`` ..
    ``max_actors``), rows per engine batch, CPUs / GPUs per engine."""
    import functools

    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from actors.models import load_spec_tokenizer
    from actors.runtime import alive_nodes, worker_environment
    from actors.sampler import PromptEncoder, generation_config_of, engine_spec, stop_token_ids, vllm_engine_kwargs

    encoder_spec = spec  # prompts are encoded with the student's own tokenizer either way
    if spec.adapter and options.merges(on_gpus=pool.num_gpus > 0):
        if len(alive_nodes()) > 1:
            raise ConfigError("generator.options.lora: merge builds the merged checkpoint in this machine's cache, "
                              "which the engines on other nodes cannot read; use lora: request on a multi-node cluster")
        spec = engine_spec(spec, options, on_gpus=pool.num_gpus > 0)
    model, lora_root = adapter_source(spec)
    kwargs = vllm_engine_kwargs(spec, options, adapter_dir=None if lora_root or not spec.adapter else model)
    model_source = kwargs.pop("model")
    stop_ids = sorted(stop_token_ids(load_spec_tokenizer(spec), generation_config_of(model_source)))
    environment = {**worker_environment(), **(env_vars or {})}
    if options.cpu_kv_cache_gib is not None:
        environment["VLLM_CPU_KVCACHE_SPACE"] = f"{options.cpu_kv_cache_gib:g}"
    concurrency = pool.min_actors if pool.min_actors == pool.max_actors else (pool.min_actors, pool.max_actors)
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_source,
            engine_kwargs=kwargs,
            batch_size=pool.batch_size,
            concurrency=concurrency,
            accelerator_type=options.accelerator_type,
            placement_group_config={"bundles": placement_bundles(options, pool)},
            dynamic_lora_loading_path=lora_root,
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
            should_continue_on_error=True,
            runtime_env={"env_vars": environment},
        ),
        preprocess=functools.partial(engine_preprocess, config=sampling, model=model or model_source),
        postprocess=functools.partial(engine_postprocess, stop_ids=stop_ids),
    )
    dataset = dataset.map_batches(
        PromptEncoder, fn_constructor_kwargs={"spec": encoder_spec, "prompt": prompt, "prompt_column": prompt_column},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=64, num_cpus=0.1,
        memory=TOKENIZER_ACTOR_MEMORY,  # a tokenizer (~360 MiB measured for SmolLM2's), so the scheduler knows
    )
    dataset = dataset.flat_map(expand_samples, fn_kwargs={"n": sampling.n, "run_seed": sampling.seed, "id_column": id_column})
    dataset = processor(dataset)
    return dataset.map_batches(SampleCollector, fn_constructor_kwargs={"n": sampling.n, "stop_ids": stop_ids},
                               compute=ray.data.ActorPoolStrategy(size=1), batch_size=16, num_cpus=0.1)
