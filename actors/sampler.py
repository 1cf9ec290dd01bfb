"""N-sample generation: ``SamplingConfig`` -> N ``Sample`` per prompt, behind one backend interface.

A ``Sampler`` builds each prompt once, the project's one way (``actors.chat.prompt_token_ids``:
the tokenizer's chat template, an optional system prompt, then an optional response prefix such
as ``<think>``), hands the prompts to a backend and returns, per prompt, N samples of
``token_ids`` / ``text`` / ``finish_reason`` plus the prompt ids, so that the scorer can later
read exactly the ids that were generated.

Sample contract (every backend):

- ``token_ids`` are the generated ids *without* the stop token (tokenizer eos, ``<|im_end|>``,
  any ``generation_config`` eos id) and without padding; ``None`` only where a backend cannot
  return ids (OpenAI-compatible HTTP);
- ``text`` is the decode of those ids with ``skip_special_tokens=True``; the response prefix is
  part of the prompt, not of the text;
- ``finish_reason`` is ``"stop"`` when a stop token ended the sample, else ``"length"``.

Backends (``BACKENDS`` maps a name to a factory):

- ``hf``: transformers ``generate`` in-process (CPU here, GPU there), prompts in chunks of
  ``batch_prompts`` with left padding, on the *fine-tuned* view of a ``ModelBundle``.
- ``vllm``: ``vllm.LLM.generate`` on token-id prompts, the adapter as a ``LoRARequest``. The
  engine is injected; everything up to the engine call is tested here, the call itself is not
  (vLLM needs a GPU). For GPU clusters the same request/response functions also feed Ray Data's
  ``ray.data.llm`` (``build_vllm_processor``): ``vLLMEngineProcessorConfig`` + ``build_processor``
  with the chat-template and tokenize stages off (prompt ids come from ``actors.chat``), one row
  per (prompt, sample) because that stage keeps only ``outputs[0]`` of each request (checked in
  ray 2.60's ``vllm_engine_stage.py``), and the N rows grouped back per prompt::

      ds = ds.map_batches(PromptEncoder, fn_constructor_kwargs={"spec": spec, "sampling": config},
                          compute=ray.data.ActorPoolStrategy(size=k))      # adds prompt_ids
      ds = ds.flat_map(expand_rows_for_vllm, fn_kwargs={"n": config.n})
      ds = build_vllm_processor(spec, config)(ds)
      ds = ds.groupby("prompt_id").map_groups(collect_vllm_processor_samples, batch_format="numpy")

- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, this
  project's Serve app) with retries, timeouts and a concurrency bound. It sends chat messages,
  not ids, and the OpenAI schema returns no ids, so ``token_ids`` is ``None`` (the pipeline
  tokenizes the text). A response prefix is sent as a final assistant message with vLLM's
  ``continue_final_message=True, add_generation_prompt=False`` extension of the chat API.

Sampling semantics:

- ``temperature=0`` is greedy decoding; it requires ``n=1`` (N greedy samples would be N copies).
- ``hf`` seeds torch once per generate call (one chunk of ``batch_prompts`` prompts) from
  ``(seed, the chunk's prompt ids)``, inside ``torch.random.fork_rng`` so the caller's RNG is
  untouched. Results are reproducible for the same seed, inputs and *batch composition*: the
  rows of one chunk draw from one random stream, so moving a prompt to another batch (another
  ``batch_prompts``, another Ray Data batch) changes its samples. Greedy results do not depend
  on batching beyond float rounding.
- ``vllm`` seeds per request (``seed``; ``seed + sample_index`` in the Ray Data path), so its
  samples do not depend on batch composition; ``openai`` sends ``seed`` per request, which
  servers honour as they see fit.
- ``hf`` neutralises the top-k and repetition penalty that a model's ``generation_config`` may
  set, so that it samples like vLLM and the OpenAI API (temperature and top-p); rarer warpers a
  model may configure (``min_p``, ``typical_p``) still apply there.

``SamplerWorker`` is the thin wrapper for ``Dataset.map_batches`` (a callable class) and, through
``sampler_actor``, a Ray actor.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.chat import Prompt, chat_messages, prompt_token_ids
from actors.config import PromptConfig, Strict, typed_options
from actors.endpoint import ChatEndpoint, EndpointError
from actors.models import (
    ModelBundle, ModelLoadError, ModelSpec, load_models, load_spec_tokenizer, local_model_dir, tokenizer_source,
)
from actors.rows import to_plain
from actors.settings import get_logger, hub_offline

logger = get_logger(__name__)

FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


# ----------------------------------------------------------------------------------------
# Config and records
# ----------------------------------------------------------------------------------------


class SamplingConfig(BaseModel):
    """How to sample.

    ``n``: samples per prompt (1..64). ``temperature``: >= 0; 0 is greedy and then ``n`` must be 1.
    ``top_p``: nucleus mass in (0, 1]. ``max_new_tokens``: most generated tokens per sample.
    ``seed``: >= 0 (see the module doc for what it makes reproducible). The prompt itself (system
    prompt, response prefix) is a ``PromptConfig``, shared with the judge and the scorer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=4, ge=1, le=64)
    temperature: float = Field(default=0.7, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=256, gt=0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _greedy_is_single(self) -> "SamplingConfig":
        if self.temperature == 0 and self.n > 1:
            raise ValueError(
                f"n: temperature=0 is greedy decoding, so all n={self.n} samples would be identical; "
                "set n=1 or a temperature > 0"
            )
        return self

    @property
    def greedy(self) -> bool:
        """True for greedy decoding (temperature 0)."""
        return self.temperature == 0


class HFOptions(Strict):
    """Options of the ``hf`` backend: ``batch_prompts`` prompts per ``generate`` call (each gives
    ``n`` rows)."""

    batch_prompts: int = Field(default=8, gt=0)


class VLLMOptions(Strict):
    """Options of the ``vllm`` backend: keyword arguments of the vLLM engine (``vllm.LLM`` /
    ``EngineArgs``), e.g. ``max_model_len``, ``gpu_memory_utilization``, ``tensor_parallel_size``,
    ``enforce_eager``. Passed through as given."""

    model_config = ConfigDict(extra="allow")


class OpenAIOptions(Strict):
    """Options of the ``openai`` backend (see ``OpenAIBackend``): the server's ``base_url``, the
    served ``model`` name (default: the model spec's base), ``api_key_env`` (the *name* of the
    environment variable holding the key), timeouts, retries and concurrency."""

    base_url: str
    model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_concurrency: int = Field(default=4, ge=1)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)


BACKEND_OPTIONS: dict[str, type[BaseModel]] = {"hf": HFOptions, "vllm": VLLMOptions, "openai": OpenAIOptions}


class GeneratorConfig(Strict):
    """Which sampler backend generates (``hf`` in-process, ``vllm``, ``openai`` endpoint) and its
    ``options`` (``HFOptions``, ``VLLMOptions`` or ``OpenAIOptions``, by backend)."""

    backend: Literal["hf", "vllm", "openai"] = "hf"
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _typed_options(self) -> "GeneratorConfig":
        self.options = typed_options(BACKEND_OPTIONS[self.backend], self.options, "options").model_dump()
        return self

    def typed(self) -> BaseModel:
        """``options`` as the backend's options model."""
        return BACKEND_OPTIONS[self.backend].model_validate(self.options)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated response: ids without stop token or padding (``None`` where a backend has no
    ids), their decoded text, and ``"stop"`` (a stop token ended it) or ``"length"``."""

    token_ids: list[int] | None
    text: str
    finish_reason: FinishReason


@dataclasses.dataclass(frozen=True)
class SamplingResult:
    """What ``Sampler.sample_with_ids`` returns: per prompt, its ids (``None`` without a tokenizer)
    and its N samples."""

    prompt_ids: list[list[int]] | None
    samples: list[list[Sample]]


def stop_token_ids(tokenizer: Any, generation_config: Any | None = None) -> frozenset[int]:
    """Ids that end a sample: the tokenizer's eos plus every ``generation_config`` eos id."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos_token_id and the generation config names none")
    return frozenset(ids)


def split_at_stop(generated: Sequence[int], stop_ids: Iterable[int]) -> tuple[list[int], FinishReason]:
    """Cut generated ids at the first stop token: (ids before it, ``"stop"``), or (all, ``"length"``).

    Everything after the first stop token is padding (or a finished row's filler) and is dropped.
    """
    stop = set(stop_ids)
    for index, token in enumerate(generated):
        if token in stop:
            return list(generated[:index]), "stop"
    return list(generated), "length"


def _chunk_seed(seed: int, chunk: Sequence[Sequence[int]]) -> int:
    """A 63-bit seed from the config seed and the chunk's prompt ids (see module doc)."""
    digest = hashlib.sha256(json.dumps([seed, [list(ids) for ids in chunk]]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)



# ----------------------------------------------------------------------------------------
# Backend interface and the front
# ----------------------------------------------------------------------------------------


class SamplerBackend(abc.ABC):
    """Generates N samples per prompt.

    ``generate(prompt_ids, config, messages, prompt)`` takes, per prompt, its token ids (``None`` as a
    whole for backends that do not read ids) and its chat messages (``None`` for backends that do
    not read messages), and returns a list with N ``Sample`` per prompt, in prompt order.
    ``needs_token_ids`` / ``needs_messages`` tell the ``Sampler`` which of the two to build.
    """

    needs_token_ids: bool = True
    needs_messages: bool = False

    @abc.abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]] | None,
        config: SamplingConfig,
        messages: list[list[dict[str, str]]] | None = None,
        prompt: PromptConfig | None = None,
    ) -> list[list[Sample]]:
        """N samples per prompt (see class doc); ``prompt`` is the prompt config the ids and
        messages were built with (backends that send messages need its response prefix)."""


class Sampler:
    """Builds prompts with ``actors.chat`` and samples them with a backend.

    ``backend``: a ``SamplerBackend``. ``tokenizer``: the model's tokenizer (may be ``None`` only
    for a backend that does not need ids; then no prompt ids are returned). ``config``: a
    ``SamplingConfig``. ``prompt``: the ``PromptConfig`` (system prompt, response prefix).
    Prompts are strings, chat message lists, or token ids (taken as is; not for backends that
    need messages).
    """

    def __init__(self, backend: SamplerBackend, tokenizer: Any | None, config: SamplingConfig | None = None,
                 prompt: PromptConfig | None = None) -> None:
        if tokenizer is None and backend.needs_token_ids:
            raise ValueError(f"{type(backend).__name__} generates from token ids: give the model's tokenizer")
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config or SamplingConfig()
        self.prompt = prompt or PromptConfig()

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Prompt token ids: chat template + system prompt + response prefix of this sampler's prompt config."""
        if self.tokenizer is None:
            raise ValueError("this sampler has no tokenizer, so it cannot build prompt ids")
        return [prompt_token_ids(self.tokenizer, prompt, self.prompt) for prompt in prompts]

    def sample_with_ids(self, prompts: Sequence[Prompt]) -> SamplingResult:
        """Prompt ids and N samples per prompt (see ``SamplingResult``)."""
        prompts = list(prompts)
        prompt_ids = self.encode(prompts) if self.tokenizer is not None else None
        messages = None
        if self.backend.needs_messages:
            messages = []
            for prompt in prompts:
                try:
                    messages.append(chat_messages(prompt, self.prompt.system_prompt))  # type: ignore[arg-type]
                except TypeError as err:
                    raise TypeError(f"{type(self.backend).__name__} sends chat messages: {err}") from err
        if not prompts:
            return SamplingResult(prompt_ids, [])
        samples = self.backend.generate(prompt_ids, self.config, messages=messages, prompt=self.prompt)
        if len(samples) != len(prompts) or any(len(row) != self.config.n for row in samples):
            raise RuntimeError(
                f"{type(self.backend).__name__} returned {[len(row) for row in samples]} samples for "
                f"{len(prompts)} prompts with n={self.config.n}"
            )
        return SamplingResult(prompt_ids, samples)

    def sample(self, prompts: Sequence[Prompt]) -> list[list[Sample]]:
        """N samples per prompt; ``sample_with_ids`` also returns the prompt ids."""
        return self.sample_with_ids(prompts).samples


# ----------------------------------------------------------------------------------------
# hf: transformers generate, in-process
# ----------------------------------------------------------------------------------------


class HFBackend(SamplerBackend):
    """transformers ``generate`` on the fine-tuned view of a ``ModelBundle`` (the model itself when
    the bundle names only a base), prompts in chunks of ``batch_prompts`` with left padding
    and an attention mask, under ``torch.inference_mode``. Seeding: see the module doc."""

    def __init__(self, bundle: ModelBundle, batch_prompts: int = 8) -> None:
        if batch_prompts < 1:
            raise ValueError("batch_prompts: expected >= 1")
        self.bundle = bundle
        self.batch_prompts = batch_prompts
        self.tokenizer = bundle.tokenizer
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(bundle.model, "generation_config", None))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.stop_ids)
        self.device = bundle.device

    @contextlib.contextmanager
    def _view(self) -> Iterator[Any]:
        if self.bundle.has_finetuned:
            with self.bundle.finetuned_view() as module:
                yield module
        else:
            yield self.bundle.model

    def generation_config(self, config: SamplingConfig) -> Any:
        """The ``GenerationConfig`` for ``config``: temperature and top-p when sampling, greedy at
        temperature 0; the top-k and repetition penalty a model's own generation config may set are
        neutralised, and every stop id ends a row."""
        from transformers import GenerationConfig

        options: dict[str, Any] = {}
        if not config.greedy:  # warpers act only when sampling; setting them for greedy only warns
            options = {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=not config.greedy,
            num_return_sequences=config.n,
            repetition_penalty=1.0,  # a logits processor, so it would act on greedy decoding too
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            **options,
        )

    def generate(self, prompt_ids, config, messages=None, prompt=None):
        if prompt_ids is None:
            raise ValueError("the hf backend generates from prompt token ids; got none")
        results: list[list[Sample]] = []
        for start in range(0, len(prompt_ids), self.batch_prompts):
            results.extend(self._generate_chunk(prompt_ids[start : start + self.batch_prompts], config))
        return results

    def _generate_chunk(self, chunk: Sequence[Sequence[int]], config: SamplingConfig) -> list[list[Sample]]:
        import torch

        if any(len(ids) == 0 for ids in chunk):
            raise ValueError("prompt_ids: an empty prompt cannot be generated from")
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        rng_devices = []
        if str(self.device).startswith("cuda"):
            device = torch.device(self.device)
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        generation_config = self.generation_config(config)
        with self._view() as model, torch.inference_mode(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(_chunk_seed(config.seed, chunk))
            output = model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=generation_config,
            )
        generated = output[:, width:].tolist()  # rows: prompt 0 samples 0..n-1, prompt 1 ...
        split = [split_at_stop(ids, self.stop_ids) for ids in generated]
        texts = self.tokenizer.batch_decode([ids for ids, _ in split], skip_special_tokens=True)
        samples = [Sample(ids, text, reason) for (ids, reason), text in zip(split, texts)]
        logger.debug("hf: %d prompts x %d samples, prompt width %d", len(chunk), config.n, width)
        return [samples[row * config.n : (row + 1) * config.n] for row in range(len(chunk))]


# ----------------------------------------------------------------------------------------
# vllm: the engine is injected; request building and result parsing are pure functions
# ----------------------------------------------------------------------------------------

# Values vLLM accepts for max_lora_rank (vllm.config.LoRAConfig, vLLM >= 0.7).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_ADAPTER_NAME = "finetuned"
VLLM_INSTALL_HINT = "vLLM is not installed: on a GPU machine run pip install 'dabon[vllm]'"


class VLLMOutputError(RuntimeError):
    """vLLM returned something that is not N finished samples per prompt."""


def vllm_sampling_kwargs(config: SamplingConfig) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ``config``."""
    return {
        "n": config.n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_new_tokens,
        "seed": config.seed,
        "skip_special_tokens": True,
    }


def vllm_prompts(prompt_ids: Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """vLLM ``TokensPrompt`` dicts (a ``TypedDict``, so plain dicts) for token-id prompts."""
    return [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_ids]


def _completion_sample(token_ids: Sequence[int], text: str, finish_reason: Any, stop_ids: Iterable[int]) -> Sample:
    """One vLLM completion -> ``Sample``: vLLM keeps the eos id in ``token_ids`` (not in ``text``)."""
    if finish_reason not in FINISH_REASONS:
        raise VLLMOutputError(f"vLLM finished a sample with finish_reason={finish_reason!r}; expected 'stop' or 'length'")
    ids = [int(t) for t in token_ids]
    if finish_reason == "stop" and ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    return Sample(ids, text, finish_reason)


def parse_vllm_outputs(request_outputs: Sequence[Any], n: int, stop_ids: Iterable[int]) -> list[list[Sample]]:
    """``vllm.RequestOutput`` list (one per prompt, in prompt order) -> N ``Sample`` per prompt.

    Reads ``.outputs[i].index / .token_ids / .text / .finish_reason``; a trailing stop id is
    dropped from ``token_ids``; a finish reason other than ``stop``/``length`` (e.g. ``abort``)
    or a wrong number of completions is a ``VLLMOutputError``.
    """
    stop_ids = frozenset(stop_ids)
    results = []
    for position, request in enumerate(request_outputs):
        completions = sorted(request.outputs, key=lambda completion: completion.index)
        if len(completions) != n:
            raise VLLMOutputError(f"vLLM returned {len(completions)} samples for prompt {position}, expected n={n}")
        results.append(
            [_completion_sample(c.token_ids, c.text, c.finish_reason, stop_ids) for c in completions]
        )
    return results


def default_sampling_params_factory(**kwargs: Any) -> Any:
    """``vllm.SamplingParams(**kwargs)``, imported at call time."""
    try:
        from vllm import SamplingParams
    except ImportError as err:
        raise ImportError(VLLM_INSTALL_HINT) from err
    return SamplingParams(**kwargs)


def _adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def vllm_engine_kwargs(spec: ModelSpec, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``spec`` (overrides win).

    ``model`` is the full fine-tuned copy when given, else the base (GGUF aliases are
    de-quantised to a local directory first); ``enable_lora`` and a ``max_lora_rank`` that fits
    the adapter are set when the spec has an adapter; ``dtype`` is the spec's (vLLM accepts
    ``auto``, ``float32``, ``bfloat16``, ``float16``).
    """
    kwargs: dict[str, Any] = {
        "model": local_model_dir(spec.finetuned or spec.base),
        "dtype": spec.dtype,
        "enable_lora": bool(spec.adapter),
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.adapter:
        adapter_dir = Path(spec.adapter).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelLoadError(f"adapter {spec.adapter!r}: no adapter_config.json (not a peft adapter directory)")
        rank = _adapter_rank(adapter_dir)
        fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fitting:
            raise ModelLoadError(f"adapter {spec.adapter!r} has LoRA rank {rank}; vLLM supports at most {VLLM_LORA_RANKS[-1]}")
        kwargs["max_lora_rank"] = fitting[0]
        if tokenizer_source(spec) != spec.base:
            kwargs["tokenizer"] = str(adapter_dir)
    kwargs.update(overrides)
    return kwargs


def _generation_config_of(model_dir: str) -> Any | None:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir, local_files_only=hub_offline())
    except (OSError, ValueError):
        return None  # no generation_config.json: the tokenizer's eos is the only stop token


class VLLMBackend(SamplerBackend):
    """vLLM's offline engine (``vllm.LLM``) on token-id prompts. Thin: requests and results go
    through ``vllm_sampling_kwargs`` / ``vllm_prompts`` / ``parse_vllm_outputs``.

    ``engine``: an object with ``generate(prompts, sampling_params, lora_request=None,
    use_tqdm=...)`` returning ``RequestOutput``-shaped objects in prompt order.
    ``lora_request``: the adapter's ``LoRARequest`` or ``None``. ``stop_ids``: ids that end a
    sample (vLLM leaves the eos id at the end of ``token_ids``). ``sampling_params_factory``:
    builds ``SamplingParams`` at call time (tests pass their own).

    UNTESTED HERE: the engine call itself and ``from_spec`` (vLLM needs a GPU); what the engine
    receives and how its results are read are tested with a stand-in engine.
    """

    def __init__(
        self,
        engine: Any,
        stop_ids: Iterable[int],
        lora_request: Any | None = None,
        sampling_params_factory: Callable[..., Any] = default_sampling_params_factory,
        use_tqdm: bool = False,
    ) -> None:
        self.engine = engine
        self.stop_ids = frozenset(stop_ids)
        self.lora_request = lora_request
        self.sampling_params_factory = sampling_params_factory
        self.use_tqdm = use_tqdm

    @classmethod
    def from_spec(cls, spec: ModelSpec | dict, tokenizer: Any | None = None, **engine_kwargs: Any) -> "VLLMBackend":
        """Build ``vllm.LLM`` for ``spec`` (see ``vllm_engine_kwargs``) and a ``LoRARequest`` for its adapter."""
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ImportError(VLLM_INSTALL_HINT) from err
        kwargs = vllm_engine_kwargs(spec, **engine_kwargs)
        tokenizer = tokenizer if tokenizer is not None else load_spec_tokenizer(spec)
        stop_ids = stop_token_ids(tokenizer, _generation_config_of(kwargs["model"]))
        engine = vllm.LLM(**kwargs)
        lora_request = None
        if spec.adapter:
            lora_request = LoRARequest(VLLM_ADAPTER_NAME, 1, str(Path(spec.adapter).expanduser().resolve()))
        return cls(engine, stop_ids, lora_request=lora_request)

    def generate(self, prompt_ids, config, messages=None, prompt=None):
        if prompt_ids is None:
            raise ValueError("the vllm backend generates from prompt token ids; got none")
        # vLLM schedules and batches itself, so all prompts go in one call (batch_prompts is for hf)
        sampling_params = self.sampling_params_factory(**vllm_sampling_kwargs(config))
        outputs = self.engine.generate(
            vllm_prompts(prompt_ids), sampling_params, lora_request=self.lora_request, use_tqdm=self.use_tqdm
        )
        if len(outputs) != len(prompt_ids):
            raise VLLMOutputError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        return parse_vllm_outputs(outputs, config.n, self.stop_ids)


# Ray Data ``ray.data.llm`` path ---------------------------------------------------------

# Columns the vLLM processor stage adds or reads, dropped again by the postprocess.
VLLM_PROCESSOR_COLUMNS = (
    "tokenized_prompt", "sampling_params", "prompt_token_ids", "num_input_tokens", "generated_tokens",
    "generated_text", "num_generated_tokens", "metrics", "embeddings", "logprobs", "prompt_logprobs",
    "time_taken_llm", "params", "model", "request_id", "batch_uuid", "prompt",
)
# The stage reads a text ``prompt`` column (and fails on chat messages), so ours travels under this name.
VLLM_PROMPT_CARRY_COLUMN = "dabon_prompt"


def expand_rows_for_vllm(row: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One row per (prompt, sample): the row ``n`` times with ``sample_index`` 0..n-1 (``Dataset.flat_map``)."""
    return [{**row, "sample_index": index} for index in range(n)]


def vllm_processor_preprocess(row: dict[str, Any], sampling_kwargs: dict[str, Any], lora_name: str | None = None) -> dict[str, Any]:
    """Row -> row for the processor's vLLM stage: ``tokenized_prompt`` from ``prompt_ids``, one
    sample per row (``n=1``, seed ``seed + sample_index``, because the stage keeps only the first
    completion of a request), ``model`` = the adapter to request LoRA, and a ``prompt`` column
    moved aside so that only ids reach vLLM (the postprocess puts it back)."""
    index = int(row["sample_index"])
    params = {**sampling_kwargs, "n": 1, "seed": int(sampling_kwargs.get("seed") or 0) + index}
    out = {key: value for key, value in row.items() if key != "prompt"}
    if "prompt" in row:
        out[VLLM_PROMPT_CARRY_COLUMN] = row["prompt"]
    out.update(tokenized_prompt=[int(t) for t in to_plain(row["prompt_ids"])], sampling_params=params)
    if lora_name:
        out["model"] = lora_name
    return out


def vllm_processor_postprocess(row: dict[str, Any], stop_ids: Sequence[int]) -> dict[str, Any]:
    """vLLM stage row -> our row with ``response``, ``response_ids`` and ``finish_reason``.

    The stage returns no finish reason: a sample that ends with a stop id stopped (the id is
    dropped), any other ended at a length limit (``max_tokens`` or the model's context).
    """
    generated = [int(t) for t in (to_plain(row.get("generated_tokens")) or [])]
    stopped = bool(generated) and generated[-1] in set(stop_ids)
    sample = _completion_sample(generated, str(row.get("generated_text") or ""), "stop" if stopped else "length", stop_ids)
    out = {key: value for key, value in row.items() if key not in VLLM_PROCESSOR_COLUMNS and key != VLLM_PROMPT_CARRY_COLUMN}
    if VLLM_PROMPT_CARRY_COLUMN in row:
        out["prompt"] = row[VLLM_PROMPT_CARRY_COLUMN]
    out.update(response=sample.text, response_ids=sample.token_ids, finish_reason=sample.finish_reason)
    return out


def collect_vllm_processor_samples(group: dict[str, Any]) -> dict[str, list[Any]]:
    """One prompt's sample rows (``groupby(id).map_groups``, numpy format) -> one row with N-lists
    ``responses`` / ``response_ids`` / ``finish_reasons`` in ``sample_index`` order; the other
    columns are taken from the first sample."""
    rows = {key: to_plain(values) for key, values in group.items()}
    order = sorted(range(len(rows["sample_index"])), key=lambda i: rows["sample_index"][i])
    per_sample = ("sample_index", "response", "response_ids", "finish_reason")
    out: dict[str, list[Any]] = {key: [values[order[0]]] for key, values in rows.items() if key not in per_sample}
    out["responses"] = [[rows["response"][i] for i in order]]
    out["response_ids"] = [[rows["response_ids"][i] for i in order]]
    out["finish_reasons"] = [[rows["finish_reason"][i] for i in order]]
    return out


class PromptEncoder:
    """``map_batches`` callable that adds ``prompt_ids`` (``actors.chat`` with the prompt config)
    to a batch with a prompt column; loads only the tokenizer."""

    def __init__(self, spec: ModelSpec, prompt: PromptConfig | None = None, prompt_column: str = "prompt") -> None:
        self.prompt = prompt or PromptConfig()
        self.tokenizer = load_spec_tokenizer(spec)
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = {key: to_plain(values) for key, values in batch.items()}
        out["prompt_ids"] = [prompt_token_ids(self.tokenizer, prompt, self.prompt) for prompt in out[self.prompt_column]]
        return out


def build_vllm_processor(
    spec: ModelSpec,
    config: SamplingConfig,
    *,
    stop_ids: Iterable[int] | None = None,
    batch_size: int = 32,
    concurrency: int | tuple[int, int] = 1,
    accelerator_type: str | None = None,
    engine_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A ``ray.data.llm`` processor that samples rows holding ``prompt_ids`` and ``sample_index``
    (see the module doc for the whole chain) with vLLM on GPU workers.

    Chat-template, tokenize and detokenize stages are off: prompt ids come from ``actors.chat``
    and vLLM's own text is kept. ``stop_ids`` default to the spec's tokenizer and generation config.
    Building needs Ray (it is started if needed), not vLLM; running needs vLLM on the workers.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = vllm_engine_kwargs(spec, **(engine_kwargs or {}))
    model_source = kwargs.pop("model")
    if stop_ids is None:
        stop_ids = stop_token_ids(load_spec_tokenizer(spec), _generation_config_of(model_source))
    processor_config = vLLMEngineProcessorConfig(
        model_source=model_source,
        engine_kwargs=kwargs,
        batch_size=batch_size,
        concurrency=concurrency,
        accelerator_type=accelerator_type,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    lora_name = str(Path(spec.adapter).expanduser().resolve()) if spec.adapter else None
    return build_processor(
        processor_config,
        preprocess=functools.partial(
            vllm_processor_preprocess, sampling_kwargs=vllm_sampling_kwargs(config), lora_name=lora_name
        ),
        postprocess=functools.partial(vllm_processor_postprocess, stop_ids=sorted(stop_ids)),
    )


# ----------------------------------------------------------------------------------------
# openai: any OpenAI-compatible chat completions server
# ----------------------------------------------------------------------------------------


def chat_request_body(model: str, messages: list[dict[str, str]], config: SamplingConfig,
                      prompt: PromptConfig | None = None) -> dict[str, Any]:
    """JSON body of ``POST /v1/chat/completions`` for one prompt and N samples.

    A response prefix becomes a final assistant message that the server continues (vLLM's
    extension ``continue_final_message=True, add_generation_prompt=False``); a server without
    that extension may reject the request or treat the prefix as a finished turn.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "n": config.n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_new_tokens,
        "seed": config.seed,
    }
    prefix = (prompt or PromptConfig()).response_prefix
    if prefix:
        body["messages"] = list(messages) + [{"role": "assistant", "content": prefix}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def parse_chat_response(payload: Any, n: int) -> list[Sample]:
    """``choices[].message.content`` and ``finish_reason`` -> N ``Sample`` (``token_ids=None``)."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list):
        raise EndpointError(f"the server's answer has no choices list: {str(payload)[:300]}")
    if len(choices) != n:
        raise EndpointError(f"the server returned {len(choices)} choices for n={n} (does it support n?)")
    samples = []
    for choice in sorted(choices, key=lambda c: c.get("index", 0)):
        reason = choice.get("finish_reason")
        if reason not in FINISH_REASONS:
            raise EndpointError(f"the server finished a sample with finish_reason={reason!r}; expected 'stop' or 'length'")
        content = (choice.get("message") or {}).get("content") or ""
        samples.append(Sample(None, content, reason))
    return samples


class OpenAIBackend(SamplerBackend):
    """Samples from an OpenAI-compatible server: one ``POST {base_url}/v1/chat/completions`` with
    ``n`` per prompt, at most ``max_concurrency`` in flight.

    ``base_url``: server root (a trailing ``/v1`` is accepted). ``model``: the served model name.
    ``api_key`` / ``api_key_env``: a Bearer key, or the *name* of the environment variable that
    holds it (keep secrets off command lines). ``timeout_s``: per request. ``max_retries``: retries
    after the first try on connection errors, timeouts, 429 and 5xx, waiting ``Retry-After`` when
    the server sends one, else ``backoff_s * 2**attempt`` (capped by ``max_backoff_s``, jittered);
    other 4xx raise at once with the server's message. Samples have ``token_ids=None``: the OpenAI
    schema returns no ids, so the pipeline tokenizes the text.
    """

    needs_token_ids = False
    needs_messages = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_concurrency: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.endpoint = ChatEndpoint(base_url, api_key, api_key_env, timeout_s, max_retries, backoff_s, max_backoff_s)
        self.url = self.endpoint.url
        self.model = model
        self.max_concurrency = max_concurrency

    def complete(self, body: dict[str, Any]) -> list[Sample]:
        """One request with retries (see class doc) -> its samples."""
        return parse_chat_response(self.endpoint.post(body), body["n"])

    def generate(self, prompt_ids, config, messages=None, prompt=None):
        if messages is None:
            raise ValueError("the openai backend sends chat messages; got none")
        bodies = [chat_request_body(self.model, prompt_messages, config, prompt) for prompt_messages in messages]
        if not bodies:
            return []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)))
        try:
            futures = [pool.submit(self.complete, body) for body in bodies]
            return [future.result() for future in futures]
        finally:
            # on the first failure, drop the requests not yet started
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------
# Registry and the Ray wrapper
# ----------------------------------------------------------------------------------------


def _hf_backend(spec: ModelSpec, options: HFOptions) -> tuple[SamplerBackend, Any]:
    bundle = load_models(spec)
    return HFBackend(bundle, batch_prompts=options.batch_prompts), bundle.tokenizer


def _vllm_backend(spec: ModelSpec, options: VLLMOptions) -> tuple[SamplerBackend, Any]:
    tokenizer = load_spec_tokenizer(spec)
    return VLLMBackend.from_spec(spec, tokenizer=tokenizer, **options.model_dump()), tokenizer


def _openai_backend(spec: ModelSpec, options: OpenAIOptions) -> tuple[SamplerBackend, Any]:
    try:
        tokenizer = load_spec_tokenizer(spec)
    except (ModelLoadError, OSError) as err:
        logger.warning("openai backend: no local tokenizer for %r, so no prompt_ids column (%s)", spec.base, err)
        tokenizer = None
    arguments = options.model_dump()
    arguments["model"] = options.model or spec.base
    return OpenAIBackend(**arguments), tokenizer


BACKENDS: dict[str, Callable[[ModelSpec, Any], tuple[SamplerBackend, Any]]] = {
    "hf": _hf_backend,
    "vllm": _vllm_backend,
    "openai": _openai_backend,
}


def build_backend(spec: ModelSpec, generator: GeneratorConfig | None = None) -> tuple[SamplerBackend, Any]:
    """(backend, tokenizer or ``None``) for a ``GeneratorConfig`` (default: ``hf``) and a model spec."""
    generator = generator or GeneratorConfig()
    return BACKENDS[generator.backend](spec, generator.typed())


class SamplerWorker:
    """Builds a sampler from config; a ``map_batches`` callable class.

    ``__call__`` takes a batch with a prompt column (strings, chat messages or token ids) and
    returns its columns as plain lists plus, per row: ``prompt_ids`` (omitted when no tokenizer
    is loadable, openai only), ``responses`` (N strings), ``response_ids`` (N id lists; omitted
    for openai) and ``finish_reasons`` (N of ``stop``/``length``).
    """

    def __init__(
        self,
        spec: ModelSpec,
        sampling: SamplingConfig | None = None,
        prompt: PromptConfig | None = None,
        generator: GeneratorConfig | None = None,
        prompt_column: str = "prompt",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        sampler_backend, tokenizer = build_backend(spec, generator)
        self.sampler = Sampler(sampler_backend, tokenizer, sampling, prompt)
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.prompt_column not in batch:
            raise KeyError(f"prompt_column: the batch has no column {self.prompt_column!r} (columns: {sorted(batch)})")
        out = {key: to_plain(values) for key, values in batch.items()}
        result = self.sampler.sample_with_ids(out[self.prompt_column])
        if result.prompt_ids is not None:
            out["prompt_ids"] = result.prompt_ids
        out["responses"] = [[sample.text for sample in row] for row in result.samples]
        if all(sample.token_ids is not None for row in result.samples for sample in row):
            out["response_ids"] = [[sample.token_ids for sample in row] for row in result.samples]
        out["finish_reasons"] = [[sample.finish_reason for sample in row] for row in result.samples]
        return out
