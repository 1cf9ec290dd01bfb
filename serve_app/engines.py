"""The model work of the Serve app as plain classes (no Ray): candidate samplers on the ``hf`` or
``vllm`` engine, and the batching scorer.

Both samplers take the prompt as token ids (built once by the ingress, so sampler and scorer see
the same ids) and a ``SamplingConfig``, and return ``{"texts", "token_ids",
"finish_reasons"}`` with N entries each: the exact generated ids (no stop token, no padding).
Sample ``i`` is drawn from its own stream seeded by ``sample_seed(seed, prompt_key(prompt_ids),
i)``, as in evaluation, so a request's candidates do not depend on what else the engine runs.

Why vLLM's ``AsyncLLM`` inside our own deployment rather than Ray Serve LLM's ``LLMServer``:
token ids go in and come out as they are (no chat template or HTTP round trip), a local LoRA
directory is one ``LoRARequest`` (Ray Serve LLM accepts only remote LoRA URIs), and each of the N
candidates is one request with its own seed (vLLM's ``n`` seeds sample ``i`` with ``seed + i``,
which the next request's seed would share).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from actors.models import ModelSpec, load_models
from actors.sampler import (
    HFBackend,
    Sampler,
    SamplingConfig,
    VLLMOptions,
    parse_vllm_outputs,
    prompt_key,
    sample_seed,
    vllm_engine_setup,
    vllm_sampling_kwargs,
)
from actors.scorer import AttributionScorer, ScorerConfig
from actors.scores import get_score
from actors.settings import get_logger

logger = get_logger(__name__)


class EngineInputError(ValueError):
    """The engine refused a request as invalid (its input validation: a prompt longer than
    ``max_model_len``, a token id outside the vocabulary); the ingress answers it with a 400."""


def candidates_of(samples: list[Any]) -> dict[str, list[Any]]:
    """``Sample`` list -> the samplers' answer (see module doc)."""
    return {
        "texts": [sample.text for sample in samples],
        "token_ids": [list(sample.token_ids or []) for sample in samples],
        "finish_reasons": [sample.finish_reason for sample in samples],
    }


class CandidateSampler:
    """N candidates with the ``hf`` backend (transformers ``generate`` on the fine-tuned view).
    ``sample`` is synchronous: the deployment runs it in a worker thread, one call at a time."""

    def __init__(self, spec: ModelSpec) -> None:
        bundle = load_models(spec)
        self.backend = HFBackend(bundle)
        self.tokenizer = bundle.tokenizer

    def sample(self, prompt_ids: list[int], sampling: SamplingConfig) -> dict[str, list[Any]]:
        """See the module doc."""
        sampler = Sampler(self.backend, self.tokenizer, sampling)
        (samples,) = sampler.sample_with_ids([list(prompt_ids)]).samples  # ids pass through unchanged
        return candidates_of(samples)


class VLLMCandidateSampler:
    """N candidates from vLLM's ``AsyncLLM`` engine in this process (its engine core runs in a child
    process). ``spec`` / ``options``: as for the evaluation's ``vllm`` backend
    (``actors.sampler.vllm_engine_kwargs``; on an engine without GPUs the adapter is merged by
    default, ``options.lora``). Concurrent ``sample`` calls are batched by the engine; a
    cancelled call aborts its requests in the engine (``AsyncLLM.generate`` does that itself)."""

    def __init__(self, spec: ModelSpec, options: VLLMOptions | None = None) -> None:
        options = options or VLLMOptions()
        # workers of a multi-GPU engine run in the replica's placement group
        parallel = options.tensor_parallel_size * options.pipeline_parallel_size > 1
        setup = vllm_engine_setup(spec, options, extra={"distributed_executor_backend": "ray"} if parallel else None)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.stop_ids = setup.stop_ids
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**setup.kwargs, disable_log_stats=True))
        self.lora_request = setup.lora_request
        self.model = setup.model
        self.max_model_len = int(self.engine.model_config.max_model_len)
        logger.info("vllm sampler ready: %s%s", self.model, f" + LoRA {setup.adapter_dir}" if setup.adapter_dir else "")

    async def _one(self, prompt_ids: list[int], config: SamplingConfig, seed: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**vllm_sampling_kwargs(config, seed), output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        try:
            async for output in self.engine.generate({"prompt_token_ids": prompt_ids}, params, f"dabon-{uuid.uuid4().hex}",
                                                     lora_request=self.lora_request):
                final = output
        except client_errors() as err:  # the engine's input validation: the request, not the engine, is at fault
            raise EngineInputError(str(err)) from None
        return final

    async def sample(self, prompt_ids: list[int], sampling: SamplingConfig) -> dict[str, list[Any]]:
        """See the module doc. Raises ``EngineInputError`` when the engine refuses the request;
        then none of its N sequences keeps running."""
        config = sampling
        ids = [int(t) for t in prompt_ids]
        key = prompt_key(ids)
        tasks = [asyncio.ensure_future(self._one(ids, config, sample_seed(config.seed, key, i))) for i in range(config.n)]
        try:
            outputs = await asyncio.gather(*tasks)
        except BaseException:  # one refused or we were cancelled: abort the others in the engine too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return candidates_of([row[0] for row in parse_vllm_outputs(outputs, 1, self.stop_ids)])

    def check_health(self) -> None:
        """Raise when the engine died (Serve then replaces the replica)."""
        if self.engine.errored:
            raise RuntimeError("the vLLM engine has died")

    def shutdown(self) -> None:
        """Stop the engine and its child processes."""
        self.engine.shutdown()


def client_errors() -> tuple[type[BaseException], ...]:
    """The exception types vLLM raises for a request it refuses as invalid."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: plain ValueError
        return (ValueError,)
    return (ValueError, VLLMClientError)


def scoring_steps(requests: list[dict[str, Any]], step_tokens: int) -> list[list[tuple[int, slice]]]:
    """Split the work of ``requests`` (``prompt_ids``, ``response_ids``) into steps of at most about
    ``step_tokens`` tokens (a prompt counts once per piece of its request that a step holds): each
    step is a list of ``(request index, slice of its candidates)``. A request larger than one step
    is cut into pieces of consecutive candidates (its prompt is then run once per piece); one
    candidate is never cut, so a step can exceed the budget by one candidate."""
    pieces: list[tuple[int, slice, int]] = []
    for index, request in enumerate(requests):
        prompt = len(request["prompt_ids"])
        candidates = [len(ids) for ids in request["response_ids"]]
        begin, size = 0, prompt
        for end, length in enumerate(candidates):
            if end > begin and size + length > step_tokens:
                pieces.append((index, slice(begin, end), size))
                begin, size = end, prompt
            size += length
        pieces.append((index, slice(begin, len(candidates)), size))
    steps: list[list[tuple[int, slice]]] = []
    current: list[tuple[int, slice]] = []
    used = 0
    for index, part, size in pieces:
        if current and used + size > step_tokens:
            steps.append(current)
            current, used = [], 0
        current.append((index, part))
        used += size
    if current:
        steps.append(current)
    return steps


class CandidateScorer:
    """The ranking score (``rule``, a registered score; latent similarity by default) at one layer
    for many (prompt ids, candidate ids) requests at once, in bounded steps.

    ``spec``: the served model (adapter or full fine-tuned copy); ``layer``: the serving layer;
    ``batch_tokens``: the scorer's forward-batch budget; ``step_tokens``: the most tokens one step
    scores (``scoring_steps``); ``plugins``: import paths of scores of your own
    (``actors.scores.load_plugins``). ``score_many(requests)`` takes dicts with ``prompt_ids`` and
    ``response_ids`` (and optionally ``cancelled``, a ``threading.Event``) and returns, per request,
    ``{"scores": [N float|None]}``, ``{"error": message}`` (one bad request does not fail the others
    of its batch) or ``{"cancelled": True}``. Between steps the requests whose ``cancelled`` is set
    are dropped, so a request whose caller gave up costs at most the step that was running.
    """

    def __init__(self, spec: ModelSpec, layer: int, batch_tokens: int = 4096, rule: str = "latent_sim",
                 plugins: tuple[str, ...] = (), step_tokens: int | None = None) -> None:
        self.layer = layer
        self.rule = rule
        self.step_tokens = step_tokens or batch_tokens
        self.steps_run = 0  # steps scored so far (for tests and logs)
        config = ScorerConfig(layers=(layer,), plugins=tuple(plugins), metrics=(rule,), batch_tokens=batch_tokens)
        self.scorer = AttributionScorer.from_spec(spec, config)
        self.per_layer = get_score(rule).per_layer

    def _of(self, result: dict[str, Any]) -> list[float | None]:
        return result[self.rule][self.layer] if self.per_layer else result[self.rule]

    def _score(self, prompts: list[list[int]], candidates: list[list[list[int]]]) -> list[list[float | None]]:
        self.steps_run += 1
        return [self._of(result) for result in self.scorer.score_ids(prompts, candidates)]

    def score_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """See class doc."""
        prompt_ids = [list(request["prompt_ids"]) for request in requests]
        response_ids = [[list(ids) for ids in request["response_ids"]] for request in requests]
        scores: list[list[float | None]] = [[] for _ in requests]
        errors: dict[int, str] = {}

        def dropped(index: int) -> bool:
            cancelled = requests[index].get("cancelled")
            return index in errors or (cancelled is not None and cancelled.is_set())

        for step in scoring_steps([{"prompt_ids": p, "response_ids": r} for p, r in zip(prompt_ids, response_ids)],
                                  self.step_tokens):
            live = [(index, part) for index, part in step if not dropped(index)]
            if not live:
                continue
            try:
                results = self._score([prompt_ids[i] for i, _ in live], [response_ids[i][part] for i, part in live])
            except Exception as err:  # noqa: BLE001 - retried one by one so that only the bad request fails
                if len(live) == 1:
                    if len(requests) == 1:
                        raise
                    errors[live[0][0]] = f"{type(err).__name__}: {err}"
                    continue
                results = []
                for index, part in live:
                    try:
                        (result,) = self._score([prompt_ids[index]], [response_ids[index][part]])
                    except Exception as one_err:  # noqa: BLE001 - reported to that request's caller
                        errors[index] = f"{type(one_err).__name__}: {one_err}"
                        result = []
                    results.append(result)
            for (index, _), result in zip(live, results, strict=True):
                if index not in errors:
                    scores[index].extend(result)
        out: list[dict[str, Any]] = []
        for index in range(len(requests)):
            if index in errors:
                out.append({"error": errors[index]})
            elif dropped(index):
                out.append({"cancelled": True})
            else:
                out.append({"scores": scores[index]})
        return out
