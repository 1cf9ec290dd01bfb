"""The ingress logic as a plain class: validation, safe prompt ids, Best-of-N selection, errors.

``RerankService`` takes the app config, the tokenizer and two async callables (injected, so the
class runs without Ray in unit tests; in the Serve app they call the sampler and scorer
deployment handles):

- ``sample(prompt_ids, sampling) -> {"texts", "token_ids", "finish_reasons"}`` (N candidates);
- ``score(prompt_ids, response_ids) -> [N floats]`` (latent similarity at the serving layer).

``chat_completion`` / ``score`` / ``models`` / ``health`` return JSON-ready dicts or raise
``ApiError`` (status, OpenAI error type, offending field, headers). Upstream failures are mapped
by ``upstream_error``: a full queue or a dead replica is 503 with ``Retry-After``, a request past
its deadline 504, anything else 500 with a request id and no stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import secrets
import time
import uuid
from typing import Any, Awaitable, Callable, Iterator

from actors.chat import UnsafePromptError, prompt_token_ids, text_token_ids
from actors.sampler import SamplingConfig
from actors.scorer import scores_row
from actors.selection import argmin_index
from actors.settings import get_logger
from serve_app.options import ServeConfig
from serve_app.schemas import ApiError, ChatCompletionRequest, ScoreRequest, parse

logger = get_logger(__name__)

SampleCall = Callable[[list[int], dict[str, Any]], Awaitable[dict[str, Any]]]
ScoreCall = Callable[[list[int], list[list[int]]], Awaitable[list[float]]]


class AdmissionGate:
    """Bounds the requests one ingress replica works on; past ``limit`` a request is refused at once
    with 503 and ``Retry-After`` instead of waiting in an unbounded queue. Not thread-safe: it is
    used from the replica's single event loop."""

    def __init__(self, limit: int, retry_after_s: float) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block, or raise a 503 ``ApiError``."""
        if self.in_flight >= self.limit:
            raise overloaded(f"the server is at its limit of {self.limit} requests in flight; retry later", self.retry_after_s)
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


def completion_tokens(token_ids: list[list[int]], finish_reasons: list[str]) -> int:
    """Generated tokens of all N candidates: their ids plus the stop token of each that stopped."""
    return sum(len(ids) for ids in token_ids) + sum(reason == "stop" for reason in finish_reasons)


class RerankService:
    """The ingress's logic (see module doc).

    ``config``: the app config. ``tokenizer``: the served model's tokenizer (prompt ids are built
    here and handed to both deployments, so sampler and scorer see the same ids). ``sample`` /
    ``score``: async callables (see module doc). ``api_token``: bearer token for ``/v1/*``, or
    ``None`` for no auth. ``max_positions``: the model's context length, if known.
    """

    def __init__(
        self,
        config: ServeConfig,
        tokenizer: Any,
        sample: SampleCall,
        score: ScoreCall,
        api_token: str | None = None,
        max_positions: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._sample = sample
        self._score = score
        self._api_token = api_token
        self.max_positions = max_positions
        self.clock = clock
        self.created = int(clock())
        self.vocab_size = len(tokenizer)
        self.gate = AdmissionGate(config.serving.max_in_flight, config.serving.retry_after_s)

    # ------------------------------------------------------------------ checks

    @property
    def auth_enabled(self) -> bool:
        """True when ``/v1/*`` requires a bearer token."""
        return self._api_token is not None

    def check_auth(self, authorization: str | None) -> None:
        """Raise a 401 ``ApiError`` unless ``authorization`` is ``Bearer <token>`` (when auth is on)."""
        if self._api_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_token.encode()):
            raise ApiError(
                401, "missing or invalid bearer token (send the header Authorization: Bearer <token>)",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    def sampling_for(self, request: ChatCompletionRequest) -> SamplingConfig:
        """The request's sampling parameters within the config's bounds; a 400 ``ApiError`` names the field."""
        limits = self.config.sampling
        n = request.n if request.n is not None else limits.default_n
        if n > limits.max_n:
            raise ApiError(400, f"n: {n} candidates exceed this server's limit of {limits.max_n}", param="n", code="invalid_value")
        new_tokens = request.new_tokens if request.new_tokens is not None else limits.default_max_tokens
        if new_tokens > limits.max_tokens:
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            raise ApiError(
                400, f"{param}: {new_tokens} new tokens exceed this server's limit of {limits.max_tokens}",
                param=param, code="invalid_value",
            )
        temperature = request.temperature if request.temperature is not None else limits.temperature
        if temperature == 0 and n > 1:
            raise ApiError(
                400, f"temperature: 0 is greedy decoding, so all n={n} candidates would be identical; use n=1 or temperature > 0",
                param="temperature", code="invalid_value",
            )
        seed = request.seed if request.seed is not None else limits.seed
        if seed is None:
            seed = secrets.randbelow(2**31)
        return SamplingConfig(
            n=n, temperature=temperature, top_p=request.top_p if request.top_p is not None else limits.top_p,
            max_new_tokens=new_tokens, seed=seed,
        )

    def encode_prompt(self, messages: list[dict[str, str]], param: str) -> list[int]:
        """Prompt ids (``actors.chat.prompt_token_ids`` with the config's prompt section) within
        ``max_prompt_tokens``; errors name ``param``."""
        limits = self.config.sampling
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"{param}: {len(messages)} messages exceed the limit of {limits.max_messages}", param=param)
        try:
            ids = prompt_token_ids(self.tokenizer, messages, self.config.prompt)
        except UnsafePromptError as err:
            raise ApiError(400, f"{param}: {err}", param=param, code="invalid_value") from None
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(
                400, f"{param}: the prompt has {len(ids)} tokens, more than this server's limit of {limits.max_prompt_tokens}",
                param=param, code="context_length_exceeded",
            )
        return ids

    def _check_positions(self, prompt_tokens: int, new_tokens: int, param: str) -> None:
        if self.max_positions and prompt_tokens + new_tokens > self.max_positions:
            raise ApiError(
                400, f"{param}: {prompt_tokens} prompt + {new_tokens} new tokens exceed the model's context of {self.max_positions}",
                param=param, code="context_length_exceeded",
            )

    # ------------------------------------------------------------------ upstream calls

    async def _call(self, stage: str, awaitable: Awaitable[Any], deadline: float, request_id: str) -> Any:
        """Await an upstream call until ``deadline`` (``clock`` time); failures become ``ApiError``."""
        remaining = deadline - self.clock()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(awaitable, timeout=remaining)
        except Exception as exc:  # mapped, logged, answered without a trace
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise upstream_error(exc, stage, self.config.serving.retry_after_s, request_id) from None

    # ------------------------------------------------------------------ endpoints

    async def chat_completion(self, body: bytes) -> dict[str, Any]:
        """``POST /v1/chat/completions``: N candidates, scored, the argmin latent similarity returned."""
        request = parse(ChatCompletionRequest, body)
        serving = self.config.serving
        if request.model is not None and request.model != serving.model_name:
            raise ApiError(
                404, f"model {request.model!r} does not exist; this server serves {serving.model_name!r}",
                param="model", code="model_not_found",
            )
        if request.dabon.skip_scoring and not serving.allow_skip_scoring:
            raise ApiError(400, "dabon.skip_scoring: not allowed on this server", param="dabon.skip_scoring")
        sampling = self.sampling_for(request)
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        prompt_ids = self.encode_prompt(messages, "messages")
        self._check_positions(len(prompt_ids), sampling.max_new_tokens, "max_tokens")
        request_id = uuid.uuid4().hex
        with self.gate.slot():
            deadline = self.clock() + serving.request_timeout_s
            sampled = await self._call("sampling", self._sample(prompt_ids, sampling.model_dump()), deadline, request_id)
            texts, token_ids, reasons = sampled["texts"], sampled["token_ids"], sampled["finish_reasons"]
            if len(texts) != sampling.n:
                raise ApiError(
                    500, f"internal error: {len(texts)} candidates for n={sampling.n} (request id {request_id})",
                    type="server_error", code="internal_error",
                )
            scores: list[float] | None = None
            selected = 0
            if not request.dabon.skip_scoring:
                scores = await self._call("scoring", self._score(prompt_ids, token_ids), deadline, request_id)
                selected = argmin_index(scores)
        completion = completion_tokens(token_ids, reasons)
        response: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(self.clock()),
            "model": serving.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": texts[selected]},
                "finish_reason": reasons[selected],
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion,
            },
        }
        if request.dabon.return_candidates:
            response["dabon"] = {
                "candidates": texts,
                "latent_sim": scores,
                "layer": self.config.scoring.layer,
                "selected": selected,
                "finish_reasons": reasons,
                "token_ids": token_ids,
                "seed": sampling.seed,
            }
        return response

    async def score(self, body: bytes) -> dict[str, Any]:
        """``POST /v1/score``: latent similarity of caller-supplied responses, as a ``dabon score`` row."""
        request = parse(ScoreRequest, body)
        limits = self.config.sampling
        if len(request.responses) > limits.max_n:
            raise ApiError(
                400, f"responses: {len(request.responses)} responses exceed this server's limit of {limits.max_n}",
                param="responses", code="invalid_value",
            )
        prompt_ids = self.encode_prompt([{"role": "user", "content": request.prompt}], "prompt")
        if request.response_ids is not None:
            response_ids = [list(ids) for ids in request.response_ids]
            for i, ids in enumerate(response_ids):
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise ApiError(400, f"response_ids[{i}]: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                                   param=f"response_ids[{i}]", code="invalid_value")
            field = "response_ids"
        else:
            # caller text is plain text: special-token strings in it are not parsed as control tokens
            response_ids = [text_token_ids(self.tokenizer, text) for text in request.responses]
            field = "responses"
        for i, ids in enumerate(response_ids):
            if len(ids) > limits.max_tokens:
                raise ApiError(400, f"{field}[{i}]: {len(ids)} tokens exceed this server's limit of {limits.max_tokens}",
                               param=f"{field}[{i}]", code="invalid_value")
            self._check_positions(len(prompt_ids), len(ids), f"{field}[{i}]")
        request_id = uuid.uuid4().hex
        with self.gate.slot():
            deadline = self.clock() + self.config.serving.request_timeout_s
            scores = await self._call("scoring", self._score(prompt_ids, response_ids), deadline, request_id)
        layer = self.config.scoring.layer
        return scores_row(request.id, {"latent_sim": {layer: scores}}, (layer,))

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one served model."""
        return {
            "object": "list",
            "data": [{"id": self.config.serving.model_name, "object": "model", "created": self.created, "owned_by": "dabon"}],
        }

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: this ingress replica is up (model replicas are Serve's health checks)."""
        return {"status": "ok", "model": self.config.serving.model_name, "in_flight": self.gate.in_flight}
