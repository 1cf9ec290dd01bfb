"""The ingress logic as a plain class: validation, safe prompt ids, Best-of-N ranking, OpenAI
answers (whole or as a stream), errors.

``RerankService`` takes the app config, the tokenizer and two async callables (injected, so the
class runs without Ray in unit tests; in the Serve app they call the sampler and scorer
deployment handles):

- ``sample(prompt_ids, sampling) -> {"texts", "token_ids", "finish_reasons"}`` (N candidates);
- ``score(prompt_ids, response_ids) -> [N float|None]`` (the ranking score, ``scoring.rule``, at
  the serving layer: latent similarity by default).

``chat_completion`` / ``completion`` return a JSON-ready dict, or a ``Stream`` of chunks when the
request streams; ``score`` / ``models`` / ``health`` return dicts; all raise ``ApiError``
(status, OpenAI error type, offending field, headers). Work is admitted before any tokenization
(``AdmissionGate``: past its limit, or while draining, a request is refused at once with 503 and
``Retry-After``); prompt length is bounded in characters before tokenization, which runs in a
worker thread so the event loop keeps answering. Upstream failures are mapped by
``upstream_error``: a full queue or a dead replica is 503 with ``Retry-After``, a request past its
deadline 504, anything else 500 with a request id and no stack trace; a request the sampler engine
refuses as invalid (``{"error"}`` from the sampler) is 400 (``engine_refusal``). While a stage has
no running replica (``set_unready``), requests that need it are 503 at once. Prompt tokens +
``max_tokens`` are checked against the engine's and the scorer's context (``context_limit``).

Ranking: candidates by the registered score ``scoring.rule`` in its direction (default: ascending
latent similarity), an empty candidate (no generated token, whose "hidden state" is the prompt's)
after every non-empty one (``actors.selection``, the rule evaluation uses); the answer's ``n``
choices are the first ``n`` of that ranking. With ``scoring.threshold`` the budgeted rule ranks
(``actors.selection.budgeted_ranking``): the score's ranking where its spread over the non-empty
candidates reaches the threshold, else sampling order (the plain sample first); the ``dabon``
block says ``threshold`` and ``decided_by``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import math
import secrets
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator

from actors.chat import (
    UnsafePromptError,
    has_control_text,
    prompt_token_ids,
    response_token_ids,
    special_token_strings,
    text_token_ids,
)
from actors.config import PromptConfig
from actors.sampler import SamplingConfig
from actors.scorer import scores_row
from actors.scores import get_score
from actors.selection import budgeted_ranking, empty_flags, rank_candidates
from actors.settings import get_logger
from serve_app.options import ServeConfig, admission_limits, token_digest
from serve_app.schemas import ApiError, ChatCompletionRequest, CompletionRequest, ScoreRequest, parse, shown

logger = get_logger(__name__)

SampleCall = Callable[[list[int], SamplingConfig], Awaitable[dict[str, Any]]]
ScoreCall = Callable[[list[int], list[list[int]]], Awaitable[list[float | None]]]


class AdmissionGate:
    """Bounds the requests one ingress replica works on; past ``limit``, or once ``draining``, a
    request is refused at once with 503 and ``Retry-After`` instead of waiting in an unbounded
    queue. Not thread-safe: it is used from the replica's single event loop.

    With ``target_latency_s``, admission also follows measured capacity: ``record`` keeps, per
    stage (sampling, scoring), an exponential average of the seconds a request spent in that stage
    divided by the requests in that stage meanwhile (its cost per concurrent request; CPU and GPU
    stages share their time among the requests they run). A new request is predicted to take the
    sum of the stages' costs times the requests it would join (``in_flight + 1``), and is refused
    (503, ``Retry-After``) when that exceeds the target, so that admitted requests finish within
    it. Until both stages have been measured, only ``limit`` applies.
    """

    SMOOTHING = 0.3

    def __init__(self, limit: int, retry_after_s: float, target_latency_s: float | None = None) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.target_latency_s = target_latency_s
        self.in_flight = 0
        self.draining = False
        self.cost_s: dict[str, float] = {}

    def record(self, stage: str, seconds: float, concurrency: float) -> None:
        """One request spent ``seconds`` in ``stage`` while ``concurrency`` requests were in it."""
        cost = seconds / max(1.0, concurrency)
        previous = self.cost_s.get(stage)
        self.cost_s[stage] = cost if previous is None else previous + self.SMOOTHING * (cost - previous)

    def predicted_latency_s(self, stages: tuple[str, ...] = ("sampling", "scoring")) -> float | None:
        """Predicted seconds of a request admitted now (``None`` until its stages were measured)."""
        if any(stage not in self.cost_s for stage in stages):
            return None
        return sum(self.cost_s[stage] for stage in stages) * (self.in_flight + 1)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block, or raise a 503 ``ApiError``."""
        if self.draining:
            error = overloaded("the server is shutting down; retry on another replica or later", self.retry_after_s)
            error.type, error.code = "service_unavailable_error", "draining"
            raise error
        if self.in_flight >= self.limit:
            raise overloaded(f"the server is at its limit of {self.limit} requests in flight; retry later", self.retry_after_s)
        predicted = self.predicted_latency_s() if self.target_latency_s is not None else None
        if predicted is not None and self.in_flight > 0 and predicted > self.target_latency_s:
            raise overloaded(f"a request admitted now would take about {predicted:.0f} s, more than this server's target of "
                             f"{self.target_latency_s:g} s; retry later", max(self.retry_after_s, predicted / (self.in_flight + 1)))
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def overloaded(message: str, retry_after_s: float) -> ApiError:
    """A 503 ``ApiError`` with a ``Retry-After`` header (whole seconds, rounded up)."""
    return ApiError(
        503, message, type="overloaded_error", code="overloaded",
        headers={"Retry-After": str(max(0, math.ceil(retry_after_s)))},
    )


def upstream_error(exc: BaseException, stage: str, retry_after_s: float, request_id: str) -> ApiError:
    """Map an exception from the sampler or scorer call (``stage``) to an ``ApiError``.

    Full queues (``BackPressureError``), unavailable deployments and dead or unreachable replicas
    (``RayActorError``) are 503 with ``Retry-After``: retrying is the right client reaction, and
    Serve replaces dead replicas. Timeouts are 504. Anything else is 500, logged with its
    traceback under ``request_id``; the answer names only the request id.
    """
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackPressureError):
        return overloaded(f"the {stage} queue is full; retry later", retry_after_s)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ApiError(504, f"the request did not finish in time ({stage} stage)", type="timeout_error", code="timeout")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError, RequestCancelledError)):
        logger.warning("request %s: %s replica unavailable: %s", request_id, stage, type(exc).__name__)
        error = overloaded(
            f"a {stage} replica failed or is unavailable while handling this request (request id {request_id}); "
            "it is being replaced, retry later",
            retry_after_s,
        )
        error.type, error.code = "service_unavailable_error", "replica_unavailable"
        return error
    logger.error("request %s: %s failed", request_id, stage, exc_info=exc)
    return ApiError(500, f"internal error while {stage} (request id {request_id})", type="server_error", code="internal_error")


ENGINE_MESSAGE_CHARS = 300


def engine_refusal(error: dict[str, Any], request_id: str) -> ApiError:
    """The 400 for a request the sampler engine refused as invalid (``{"message"}`` from the sampler
    replica: vLLM's input validation, e.g. a prompt longer than ``max_model_len``); the engine's
    message is cut to ``ENGINE_MESSAGE_CHARS``."""
    message = str(error.get("message", "invalid request"))[:ENGINE_MESSAGE_CHARS]
    logger.info("request %s: the engine refused it: %s", request_id, message)
    return ApiError(400, f"the sampler engine refused the request: {message}", param=error.get("param"),
                    code="invalid_value")


def completion_tokens(token_ids: list[list[int]], finish_reasons: list[str]) -> int:
    """Generated tokens of all N candidates: their ids plus the stop token of each that stopped."""
    return sum(len(ids) for ids in token_ids) + sum(reason == "stop" for reason in finish_reasons)


@dataclasses.dataclass
class Stream:
    """A streamed answer: the chunk objects, sent as Server-Sent Events and closed by ``[DONE]``."""

    chunks: list[dict[str, Any]]


@dataclasses.dataclass
class Generation:
    """What one request sampled and how the candidates rank."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    scores: list[float | None] | None
    ranking: list[int]
    # wall seconds this request spent waiting on each upstream stage (``sampling``, ``scoring``),
    # queueing in the deployment included: what a Best-of-N request costs beyond plain sampling
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    decided_by: str | None = None  # budgeted rule: "score" or "plain"; None without a threshold or unscored

    @property
    def empty(self) -> list[bool]:
        return empty_flags(self.token_ids)

    def usage(self) -> dict[str, int]:
        completion = completion_tokens(self.token_ids, self.finish_reasons)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}


class RerankService:
    """The ingress's logic (see module doc).

    ``config``: the app config. ``tokenizer``: the served model's tokenizer (prompt ids are built
    here and handed to both deployments, so sampler and scorer see the same ids). ``sample`` /
    ``score``: async callables (see module doc). ``token_sha256``: digest of the bearer token for
    ``/v1/*`` and ``/dabon/*`` (``token_digest``), or ``None`` for no auth. ``max_positions``: the
    scorer's context length (the model's ``max_position_embeddings``), if known. ``engine_max_len``:
    the sampler engine's context length (vLLM's ``max_model_len``; ``None`` when the engine has none
    of its own, as HF ``generate``); the ingress replaces it with the running engine's own value
    once the sampler answers (``set_engine_max_len``). A generation request's prompt tokens plus its
    ``max_tokens`` must fit the smaller of the two, a scoring request's prompt plus each response
    the scorer's.

    Readiness (``set_unready``): the ingress marks a stage (``sampling``, ``scoring``) unready
    while its deployment has no running replica; then ``/healthz`` is 503, new requests get 503 with
    ``Retry-After`` at once, and the calls waiting for that stage are cancelled and answered 503.
    """

    def __init__(
        self,
        config: ServeConfig,
        tokenizer: Any,
        sample: SampleCall,
        score: ScoreCall,
        token_sha256: str | None = None,
        max_positions: int | None = None,
        clock: Callable[[], float] = time.time,
        engine_max_len: int | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._sample = sample
        self._score = score
        self._token_sha256 = token_sha256
        self.max_positions = max_positions
        self.engine_max_len = engine_max_len
        self.unready: dict[str, str] = {}
        self._pending: dict[str, set[asyncio.Future]] = {"sampling": set(), "scoring": set()}
        self._dropped: set[asyncio.Future] = set()
        self.clock = clock
        self.created = int(clock())
        self.vocab_size = len(tokenizer)
        self.gate = AdmissionGate(admission_limits(config)["ingress_in_flight"], config.serving.retry_after_s,
                                  config.serving.target_latency_s)
        self._in_stage: dict[str, int] = {"sampling": 0, "scoring": 0}

    # ------------------------------------------------------------------ checks

    def check_auth(self, authorization: str | None) -> None:
        """Raise a 401 ``ApiError`` unless ``authorization`` is ``Bearer <token>`` (when auth is on);
        the comparison is of digests, in constant time."""
        if self._token_sha256 is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        presented = token_digest(token.strip())
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), self._token_sha256.encode()):
            raise ApiError(
                401, "missing or invalid bearer token (send the header Authorization: Bearer <token>)",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, model: str | None) -> None:
        """A 404 unless ``model`` is absent or the served model's name."""
        name = self.config.serving.model_name
        if model is not None and model != name:
            raise ApiError(404, f"model {shown(model)} does not exist; this server serves {name!r}", param="model",
                           code="model_not_found")

    def sampling_for(self, request: ChatCompletionRequest | CompletionRequest) -> SamplingConfig:
        """The request's sampling within the config's bounds (the request's ``dabon.candidates`` /
        ``best_of`` or else ``sampling.n`` candidates, at least its ``n``; its ``max_tokens`` or
        else ``sampling.max_new_tokens``); a 400 ``ApiError`` names the field."""
        limits = self.config.sampling
        candidate_field = "best_of" if isinstance(request, CompletionRequest) and request.best_of is not None else "dabon.candidates"
        temperature = request.temperature if request.temperature is not None else limits.temperature
        asked = request.candidates
        if temperature == 0:  # greedy: every candidate would be the same, so there is one
            if asked is not None and asked > 1:
                raise ApiError(400, f"{candidate_field}: temperature 0 is greedy decoding, so {asked} candidates would be "
                                    "identical; send temperature > 0 or one candidate", param=candidate_field, code="invalid_value")
            if request.n > 1:
                raise ApiError(400, f"n: temperature 0 is greedy decoding, so the {request.n} choices would be identical; "
                                    "send temperature > 0 or n=1", param="n", code="invalid_value")
            candidates = 1
        else:
            candidates = asked if asked is not None else max(limits.n, request.n)
        if candidates > limits.max_n:
            param = candidate_field if asked is not None else "n"
            raise ApiError(400, f"{param}: {candidates} candidates exceed this server's limit of {limits.max_n}",
                           param=param, code="invalid_value")
        if request.n > candidates:
            raise ApiError(400, f"n: {request.n} choices need at least {request.n} candidates, but {candidate_field} is "
                                f"{candidates}", param="n", code="invalid_value")
        new_tokens = request.new_tokens if request.new_tokens is not None else limits.max_new_tokens
        if new_tokens > limits.max_new_tokens_limit:
            param = request.token_field if isinstance(request, ChatCompletionRequest) else "max_tokens"
            raise ApiError(400, f"{param}: {new_tokens} new tokens exceed this server's limit of {limits.max_new_tokens_limit}",
                           param=param, code="invalid_value")
        seed = request.seed if request.seed is not None else limits.seed
        if seed is None:
            seed = secrets.randbelow(2**31)
        return SamplingConfig(
            n=candidates, temperature=temperature, top_p=request.top_p if request.top_p is not None else limits.top_p,
            max_new_tokens=new_tokens, seed=seed,
        )

    def _check_chars(self, chars: int, param: str) -> None:
        limit = self.config.sampling.max_prompt_chars
        if chars > limit:
            raise ApiError(400, f"{param}: {chars} characters exceed this server's limit of {limit}", param=param,
                           code="context_length_exceeded")

    def _check_prompt_tokens(self, ids: list[int], param: str) -> list[int]:
        limit = self.config.sampling.max_prompt_tokens
        if len(ids) > limit:
            raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens, more than this server's limit of {limit}",
                           param=param, code="context_length_exceeded")
        return ids

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param=param, code="invalid_value")

    async def encode_messages(self, messages: list[dict[str, str]], prompt: PromptConfig, param: str = "messages",
                              continuation: str | None = None) -> list[int]:
        """Prompt ids of chat messages (``actors.chat.prompt_token_ids`` with ``prompt``), bounded in
        messages and characters before tokenizing, in tokens after; tokenized in a worker thread.

        ``continuation``: the text of a final assistant turn to continue (``continue_final_message``),
        which takes the place of ``prompt.response_prefix``. It is client text, so it stays plain
        text like every other turn: when it holds special-token text it is tokenized on its own
        with special tokens split (``actors.chat.text_token_ids``), never parsed into control tokens.
        """
        limits = self.config.sampling
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"{param}: {len(messages)} messages exceed the limit of {limits.max_messages}", param=param)
        prefix = prompt.response_prefix if continuation is None else continuation
        self._check_chars(sum(len(m["content"]) for m in messages) + len(prefix), param)

        def encode() -> list[int]:
            if continuation is None:
                return prompt_token_ids(self.tokenizer, messages, prompt)
            if not has_control_text(continuation, special_token_strings(self.tokenizer)):
                return prompt_token_ids(self.tokenizer, messages, prompt.model_copy(update={"response_prefix": continuation}))
            opening = prompt_token_ids(self.tokenizer, messages, prompt.model_copy(update={"response_prefix": ""}))
            return opening + text_token_ids(self.tokenizer, continuation)

        try:
            ids = await asyncio.to_thread(encode)
        except UnsafePromptError as err:
            raise ApiError(400, f"{param}: {err}", param=param, code="invalid_value") from None
        return self._check_prompt_tokens(ids, param)

    async def encode_raw(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Prompt ids of a raw completion prompt: token ids as they are, or text tokenized as vLLM
        does (the tokenizer's special tokens, e.g. BOS, added; special-token text parsed)."""
        if isinstance(prompt, list):
            self._check_ids(prompt, param)
            return self._check_prompt_tokens(list(prompt), param)
        self._check_chars(len(prompt), param)
        ids = await asyncio.to_thread(lambda: list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]))
        return self._check_prompt_tokens(ids, param)

    def context_limit(self, generating: bool = True) -> tuple[int | None, str]:
        """The context length a request must fit and where it comes from: for generation the
        smaller of the engine's ``max_model_len`` and the scorer's model context, for scoring the
        scorer's alone."""
        limits = [(self.max_positions, "the scorer model's max_position_embeddings")]
        if generating:
            limits.append((self.engine_max_len, "the sampler engine's max_model_len"))
        known = [(value, source) for value, source in limits if value]
        return min(known) if known else (None, "unknown")

    def _check_positions(self, prompt_tokens: int, new_tokens: int, param: str, prompt_param: str | None = None,
                         generating: bool = True) -> None:
        """A 400 naming the prompt tokens, the new tokens and the limit when they do not fit the
        context (``context_limit``); ``prompt_param`` is named when the prompt alone is too long."""
        limit, source = self.context_limit(generating)
        if limit is None or prompt_tokens + new_tokens <= limit:
            return
        if prompt_param is not None and prompt_tokens >= limit:
            raise ApiError(400, f"{prompt_param}: the prompt has {prompt_tokens} tokens; the context limit is {limit} tokens "
                                f"({source}), which must also hold at least one new token",
                           param=prompt_param, code="context_length_exceeded")
        field = param.rsplit(".", 1)[-1]
        raise ApiError(
            400, f"{param}: {prompt_tokens} prompt tokens + {field} {new_tokens} = {prompt_tokens + new_tokens} tokens exceed "
                 f"the context limit of {limit} tokens ({source}); lower {field} to at most {max(0, limit - prompt_tokens)}",
            param=param, code="context_length_exceeded",
        )

    # ------------------------------------------------------------------ readiness

    def set_engine_max_len(self, value: int | None) -> None:
        """The running engine's own context length (``None``: it has none)."""
        self.engine_max_len = value

    def set_unready(self, unready: dict[str, str]) -> None:
        """Mark the stages in ``unready`` (stage -> reason) as unable to take work; calls waiting for
        a stage that just became unready are cancelled and answered 503 with ``Retry-After``."""
        for stage in set(unready) - set(self.unready):
            for task in list(self._pending.get(stage, ())):
                if not task.done():
                    self._dropped.add(task)
                    task.cancel()
        self.unready = dict(unready)

    def check_ready(self, stages: tuple[str, ...] = ("sampling", "scoring")) -> None:
        """A 503 with ``Retry-After`` at once when a stage a request needs cannot take work."""
        down = [f"{stage} ({self.unready[stage]})" for stage in stages if stage in self.unready]
        if down:
            error = overloaded(f"no {', '.join(down)} replica is running; retry later", self.config.serving.retry_after_s)
            error.type, error.code = "service_unavailable_error", "replica_unavailable"
            raise error

    # ------------------------------------------------------------------ upstream calls

    async def _call(self, stage: str, awaitable: Awaitable[Any], deadline: float, request_id: str) -> Any:
        """Await an upstream call until ``deadline`` (``clock`` time); failures become ``ApiError``."""
        remaining = deadline - self.clock()
        if remaining <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise upstream_error(TimeoutError(), stage, self.config.serving.retry_after_s, request_id)
        task = asyncio.ensure_future(awaitable)
        pending = self._pending.setdefault(stage, set())
        pending.add(task)
        started, crowd = self.clock(), self._in_stage.get(stage, 0) + 1
        self._in_stage[stage] = crowd
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout=remaining)
            # the stage's cost per concurrent request, from the requests in it at the start and the end
            self.gate.record(stage, self.clock() - started, (crowd + self._in_stage[stage]) / 2)
        except asyncio.CancelledError:
            if task not in self._dropped:  # our own caller was cancelled (client gone, drain timeout)
                task.cancel()
                raise
            error = overloaded(f"the {stage} stage lost its replicas while this request waited (request id {request_id}); "
                               "retry later", self.config.serving.retry_after_s)
            error.type, error.code = "service_unavailable_error", "replica_unavailable"
            raise error from None
        except Exception as exc:  # mapped, logged, answered without a trace
            task.cancel()
            raise upstream_error(exc, stage, self.config.serving.retry_after_s, request_id) from None
        finally:
            self._in_stage[stage] -= 1
            pending.discard(task)
            self._dropped.discard(task)
        if isinstance(result, dict) and "error" in result and stage == "sampling":
            raise engine_refusal(result["error"], request_id)
        return result

    async def _generate(self, prompt_ids: list[int], sampling: SamplingConfig, skip_scoring: bool,
                        deadline: float, request_id: str) -> Generation:
        timings: dict[str, float] = {}
        started = self.clock()
        sampled = await self._call("sampling", self._sample(prompt_ids, sampling), deadline, request_id)
        timings["sampling_s"] = self.clock() - started
        texts, token_ids, reasons = sampled["texts"], sampled["token_ids"], sampled["finish_reasons"]
        if len(texts) != sampling.n:
            raise ApiError(500, f"internal error: {len(texts)} candidates for {sampling.n} (request id {request_id})",
                           type="server_error", code="internal_error")
        scores: list[float | None] | None = None
        ranking = list(range(sampling.n))
        decided_by = None
        if not skip_scoring:
            started = self.clock()
            scores = await self._call("scoring", self._score(prompt_ids, token_ids), deadline, request_id)
            timings["scoring_s"] = self.clock() - started
            if len(scores) != sampling.n:
                raise ApiError(500, f"internal error: {len(scores)} scores for {sampling.n} candidates (request id {request_id})",
                               type="server_error", code="internal_error")
            rule, threshold = self.config.scoring.rule, self.config.scoring.threshold
            if threshold is None:
                ranking = rank_candidates(rule, scores, empty_flags(token_ids))
            else:
                ranking, choice = budgeted_ranking(rule, scores, empty_flags(token_ids), threshold)
                decided_by = choice.decided_by
        return Generation(request_id, prompt_ids, sampling, texts, token_ids, reasons, scores, ranking, timings,
                          decided_by)

    async def _run(self, request: ChatCompletionRequest | CompletionRequest,
                   encode: Callable[[], Awaitable[list[int]]]) -> Generation:
        """Checks, admission, prompt ids, sampling and ranking of one generation request."""
        self.check_model(request.model)
        if request.dabon.skip_scoring and not self.config.serving.allow_skip_scoring:
            raise ApiError(400, "dabon.skip_scoring: not allowed on this server", param="dabon.skip_scoring")
        sampling = self.sampling_for(request)
        request_id = uuid.uuid4().hex
        self.check_ready(("sampling",) if request.dabon.skip_scoring else ("sampling", "scoring"))
        with self.gate.slot():  # admitted before any tokenization
            deadline = self.clock() + self.config.serving.request_timeout_s
            prompt_ids = await encode()
            chat = isinstance(request, ChatCompletionRequest)
            param = request.token_field if chat else "max_tokens"
            self._check_positions(len(prompt_ids), sampling.max_new_tokens, param, "messages" if chat else "prompt")
            return await self._generate(prompt_ids, sampling, request.dabon.skip_scoring, deadline, request_id)

    def _dabon_block(self, generation: Generation) -> dict[str, Any]:
        return {
            "candidates": generation.texts,
            "token_ids": generation.token_ids,
            "finish_reasons": generation.finish_reasons,
            self.config.scoring.rule: generation.scores,  # "latent_sim" unless scoring.rule says otherwise
            "rule": self.config.scoring.rule,
            "layer": self.config.scoring.layer,
            "threshold": self.config.scoring.threshold,  # null: the plain rule
            "decided_by": generation.decided_by,  # budgeted rule: "score" or "plain"; null otherwise
            "ranking": generation.ranking,
            "selected": generation.ranking[0],
            "empty": generation.empty,
            "seed": generation.sampling.seed,
            "timings": {key: round(value, 6) for key, value in generation.timings.items()},
        }

    # ------------------------------------------------------------------ endpoints

    async def chat_completion(self, body: bytes) -> dict[str, Any] | Stream:
        """``POST /v1/chat/completions``: candidates sampled and scored, the ``n`` best returned."""
        request = parse(ChatCompletionRequest, body)
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        prompt = self.config.prompt
        continuation = None
        if request.continue_final_message:  # the client's assistant turn replaces the configured prefix
            continuation = messages[-1]["content"]
            messages = messages[:-1]
        generation = await self._run(request, lambda: self.encode_messages(messages, prompt, continuation=continuation))
        chosen = generation.ranking[: request.n]
        base = {"id": f"chatcmpl-{generation.request_id}", "created": int(self.clock()), "model": self.config.serving.model_name}
        if request.stream:
            return Stream(self._chat_chunks(request, generation, chosen, base))
        choices = []
        for index, candidate in enumerate(chosen):
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": generation.texts[candidate]},
                "finish_reason": generation.finish_reasons[candidate],
                "logprobs": None,
            }
            if request.return_token_ids:
                choice["token_ids"] = generation.token_ids[candidate]
            choices.append(choice)
        response: dict[str, Any] = {**base, "object": "chat.completion", "choices": choices, "usage": generation.usage()}
        if request.return_token_ids:
            response["prompt_token_ids"] = generation.prompt_ids
        if request.dabon.return_candidates:
            response["dabon"] = self._dabon_block(generation)
        return response

    def _chat_chunks(self, request: ChatCompletionRequest, generation: Generation, chosen: list[int],
                     base: dict[str, Any]) -> list[dict[str, Any]]:
        chunk = {**base, "object": "chat.completion.chunk"}
        out: list[dict[str, Any]] = []
        for index, candidate in enumerate(chosen):
            first: dict[str, Any] = {**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                            "logprobs": None, "finish_reason": None}]}
            if index == 0 and request.return_token_ids:
                first["prompt_token_ids"] = generation.prompt_ids
            content: dict[str, Any] = {"index": index, "delta": {"content": generation.texts[candidate]},
                                       "logprobs": None, "finish_reason": None}
            if request.return_token_ids:
                content["token_ids"] = generation.token_ids[candidate]
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": generation.finish_reasons[candidate]}
            out += [first, {**chunk, "choices": [content]}, {**chunk, "choices": [last]}]
        if request.stream_options is not None and request.stream_options.include_usage:
            out.append({**chunk, "choices": [], "usage": generation.usage()})
        if request.dabon.return_candidates:
            out.append({**chunk, "choices": [], "dabon": self._dabon_block(generation)})
        return out

    async def completion(self, body: bytes) -> dict[str, Any] | Stream:
        """``POST /v1/completions``: a raw prompt, candidates sampled and scored, the ``n`` best returned."""
        request = parse(CompletionRequest, body)
        generation = await self._run(request, lambda: self.encode_raw(request.prompt))
        chosen = generation.ranking[: request.n]
        base = {"id": f"cmpl-{generation.request_id}", "object": "text_completion", "created": int(self.clock()),
                "model": self.config.serving.model_name}
        choices = []
        for index, candidate in enumerate(chosen):
            choice: dict[str, Any] = {"index": index, "text": generation.texts[candidate],
                                      "finish_reason": generation.finish_reasons[candidate], "logprobs": None}
            if request.return_token_ids:
                choice["token_ids"] = generation.token_ids[candidate]
                choice["prompt_token_ids"] = generation.prompt_ids
            choices.append(choice)
        if request.stream:
            out = []
            for choice in choices:
                out.append({**base, "choices": [{**choice, "finish_reason": None}]})
                out.append({**base, "choices": [{"index": choice["index"], "text": "", "logprobs": None,
                                                 "finish_reason": choice["finish_reason"]}]})
            if request.stream_options is not None and request.stream_options.include_usage:
                out.append({**base, "choices": [], "usage": generation.usage()})
            if request.dabon.return_candidates:
                out.append({**base, "choices": [], "dabon": self._dabon_block(generation)})
            return Stream(out)
        response: dict[str, Any] = {**base, "choices": choices, "usage": generation.usage()}
        if request.dabon.return_candidates:
            response["dabon"] = self._dabon_block(generation)
        return response

    async def score(self, body: bytes) -> dict[str, Any]:
        """``POST /dabon/v1/score``: the ``dabon score`` output row of one input row (the ranking
        score ``scoring.rule`` at the serving layer, and its choice)."""
        request = parse(ScoreRequest, body)
        limits = self.config.sampling
        if request.count > limits.max_n:
            field = "response_ids" if request.response_ids is not None else "responses"
            raise ApiError(400, f"{field}: {request.count} responses exceed this server's limit of {limits.max_n}",
                           param=field, code="invalid_value")
        request_id = uuid.uuid4().hex
        self.check_ready(("scoring",))
        with self.gate.slot():
            if request.prompt_ids is not None:
                self._check_ids(request.prompt_ids, "prompt_ids")
                prompt_ids = self._check_prompt_tokens(list(request.prompt_ids), "prompt_ids")
            else:
                prompt_ids = await self.encode_messages([{"role": "user", "content": request.prompt or ""}], self.config.prompt,
                                                        "prompt")
            if request.response_ids is not None:
                response_ids = [list(ids) for ids in request.response_ids]
                for i, ids in enumerate(response_ids):
                    self._check_ids(ids, f"response_ids[{i}]")
                field = "response_ids"
            else:
                texts = request.responses or []
                self._check_chars(max(len(t) for t in texts), "responses")
                # caller text is plain text: special-token strings in it are not parsed as control tokens
                response_ids = await asyncio.to_thread(lambda: [response_token_ids(self.tokenizer, t) for t in texts])
                field = "responses"
            for i, ids in enumerate(response_ids):
                if len(ids) > limits.max_new_tokens_limit:
                    raise ApiError(400, f"{field}[{i}]: {len(ids)} tokens exceed this server's limit of {limits.max_new_tokens_limit}",
                                   param=f"{field}[{i}]", code="invalid_value")
                self._check_positions(len(prompt_ids), len(ids), f"{field}[{i}]", generating=False)
            total = len(prompt_ids) + sum(len(ids) for ids in response_ids)
            budget = self.config.scoring.max_request_tokens
            if total > budget:
                raise ApiError(400, f"{field}: {len(prompt_ids)} prompt tokens + {total - len(prompt_ids)} response tokens = "
                                    f"{total} exceed this server's scoring budget of {budget} tokens per request",
                               param=field, code="invalid_value")
            deadline = self.clock() + self.config.serving.request_timeout_s
            scores = await self._call("scoring", self._score(prompt_ids, response_ids), deadline, request_id)
        layer, rule = self.config.scoring.layer, self.config.scoring.rule
        values = {layer: scores} if get_score(rule).per_layer else scores
        return scores_row(request.id, {rule: values}, (layer,), empty=empty_flags(response_ids), rule=rule,
                          threshold=self.config.scoring.threshold)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one served model."""
        return {
            "object": "list",
            "data": [{"id": self.config.serving.model_name, "object": "model", "created": self.created, "owned_by": "dabon"}],
        }

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``status`` ``ok``, ``draining`` or ``unavailable`` (a sampler or scorer
        deployment has no running replica, e.g. while the engine loads or a replica is replaced;
        ``unready`` says which and why), the model name and this replica's requests in flight."""
        status = "draining" if self.gate.draining else "unavailable" if self.unready else "ok"
        out = {"status": status, "model": self.config.serving.model_name, "in_flight": self.gate.in_flight}
        if self.unready:
            out["unready"] = dict(self.unready)
        return out
