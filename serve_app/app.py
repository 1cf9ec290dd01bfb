"""The Ray Serve app: an OpenAI-compatible ingress, a sampler (vLLM or HF) and a batching scorer.

Launch::

    dabon random-adapter --out runs/demo/adapter           # once: a random (untrained) adapter
    dabon serve --adapter runs/demo/adapter                 # local Ray, http://127.0.0.1:8000
    serve run serve_app/config.yaml                         # the same app through Serve's CLI
    serve deploy serve_app/config.yaml --address http://127.0.0.1:8265   # onto a running cluster
    kubectl apply -f deploy/rayservice.yaml                 # KubeRay RayService

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "n": 2, "dabon": {"candidates": 4}}'

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI's, ``stream`` included),
``GET /v1/models``, ``POST /dabon/v1/score`` (a ``dabon score`` row), ``GET /healthz`` (no auth;
503 while draining and while the sampler or scorer has no running replica), ``GET /openapi.json``.
A request body must arrive within ``serving.body_timeout_s`` (else 408); the ingress takes
``serving.control_slots`` requests beyond what it admits, so health checks, model listing and
bodies being read never wait behind admitted work.

Request flow: ``IngressDeployment`` (FastAPI, ``serve_app.service.RerankService``) checks auth
and Content-Type, admits the request (or answers 503 at once), builds the prompt ids once
(``actors.chat``: user text never becomes control tokens) in a worker thread;
``SamplerDeployment`` generates N candidates from those ids (``generator.backend``: vLLM's
``AsyncLLM``, batching concurrent requests, or HF ``generate``) and returns their exact token
ids; ``ScorerDeployment`` scores the same prompt ids + generated ids (latent similarity at the
serving layer, HF hidden states of both views), batching concurrent requests with
``@serve.batch``; the ingress ranks the candidates and answers with the best ``n``.

Shutdown: ``dabon serve`` creates a ``DrainControl`` actor next to the app; on SIGTERM it tells
the ingress replicas to drain (new requests get 503, ``/healthz`` 503), waits until their
requests in flight are answered or ``serving.drain_timeout_s`` passed, then stops Serve. Serve
itself waits ``drain_timeout_s`` for a replica's requests before it stops that replica.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.chat import resolve_prompt
from actors.config import ConfigError, validate
from actors.models import ModelSpec, check_spec, hub_offline, load_spec_tokenizer, local_model_dir
from actors.sampler import GeneratorConfig, SamplingConfig
from actors.scores import load_plugins
from actors.settings import get_logger
from serve_app.engines import CandidateSampler, CandidateScorer, EngineInputError, VLLMCandidateSampler
from serve_app.options import (
    SAMPLER_NAME,
    SCORER_NAME,
    ServeConfig,
    deployment_options,
    resolve_api_token,
    token_digest,
    torch_threads,
)
from serve_app.schemas import ApiError, ChatCompletionRequest, CompletionRequest, ScoreRequest, error_body
from serve_app.service import RerankService, Stream, overloaded

logger = get_logger(__name__)

DRAIN_NAMESPACE = "dabon"
DRAIN_POLL_S = 0.2


def drain_actor_name(app_name: str) -> str:
    """Name of the ``DrainControl`` actor of the Serve application ``app_name``."""
    return f"drain-{app_name}"


@ray.remote(num_cpus=0)
class DrainControl:
    """Shared shutdown state of one app: ``dabon serve`` calls ``start``; every ingress replica
    calls ``report`` every ``DRAIN_POLL_S`` with its requests in flight and learns whether to drain."""

    def __init__(self) -> None:
        self.draining = False
        self.reports: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        self.draining = True

    def report(self, replica: str, in_flight: int, draining: bool) -> bool:
        self.reports[replica] = {"in_flight": in_flight, "draining": draining, "at": time.time()}
        return self.draining

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {"draining": self.draining,
                "replicas": {name: {**report, "age_s": now - report["at"]} for name, report in self.reports.items()}}


def drained(status: dict[str, Any], fresh_s: float = 2.0) -> bool:
    """True when every ingress replica that reported in the last ``fresh_s`` drains with nothing in flight."""
    live = [report for report in status["replicas"].values() if report["age_s"] <= fresh_s]
    return all(report["draining"] and report["in_flight"] == 0 for report in live)


def model_max_positions(spec: ModelSpec) -> int | None:
    """``max_position_embeddings`` of the served model's config (``None`` if it cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            local_model_dir(spec.finetuned or spec.base), local_files_only=hub_offline(),
            trust_remote_code=spec.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        logger.warning("context length of %s unknown (%s); only max_prompt_tokens bounds prompts", spec.base, err)
        return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def configured_engine_max_len(config: ServeConfig) -> int | None:
    """The sampler engine's context length as configured (``generator.options.max_model_len`` of a
    vLLM engine; ``None``: the engine takes the model's, or HF ``generate``, which has none). The
    ingress replaces it with the running engine's own value as soon as the sampler answers."""
    if config.generator.backend != "vllm":
        return None
    return getattr(config.generator.options, "max_model_len", None)


def parse_app_config(args: dict[str, Any] | ServeConfig | None) -> ServeConfig:
    """The typed config from a builder ``args`` mapping; errors are ``ConfigError`` naming the key."""
    if isinstance(args, ServeConfig):
        return args
    return validate(ServeConfig, dict(args or {}))


def absolute_model_paths(config: ServeConfig, base_dir: Path | None = None) -> ServeConfig:
    """``config`` with relative local model/adapter paths made absolute against ``base_dir`` (cwd).

    Replicas run in other working directories, so a relative path must be resolved where the app
    is built. Names that are not existing local paths (aliases, Hub ids) are left alone.
    """
    base_dir = base_dir or Path.cwd()
    updates: dict[str, Any] = {}
    for field in ("base", "adapter", "finetuned"):
        value = getattr(config.model, field)
        if value and not Path(value).expanduser().is_absolute() and (base_dir / value).exists():
            updates[field] = str((base_dir / value).resolve())
    if not updates:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update=updates)})


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


JSON_TYPES = ("application/json",)


def _schema_components(*models: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """JSON schemas of request models with their ``$defs`` as OpenAPI components."""
    components: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        refs[model.__name__] = {"$ref": f"#/components/schemas/{model.__name__}"}
    return components, refs


def openapi_document(api: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the request bodies the routes parse themselves
    (``serve_app.schemas``) and the error shape of every non-2xx answer."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(title="dabon", version="2", routes=api.routes,
                           description="Best-of-N reranking by latent attribution, OpenAI-compatible.")
    components, refs = _schema_components(ChatCompletionRequest, CompletionRequest, ScoreRequest)
    components["Error"] = {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    }
    document.setdefault("components", {}).setdefault("schemas", {}).update(components)
    document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    bodies = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
              "/dabon/v1/score": "ScoreRequest"}
    error = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            operation["responses"] = {"200": {"description": "OK"}, "4XX": error, "5XX": error}
            if path != "/healthz":
                operation["security"] = [{"bearer": []}]
            if path in bodies:
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[bodies[path]]}}}
    return document


def error_response(error: ApiError) -> JSONResponse:
    """An ``ApiError`` as its OpenAI-shaped JSON response."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def event_stream(stream: Stream) -> StreamingResponse:
    """A streamed answer as server-sent events, ``[DONE]`` last."""

    async def events():
        for chunk in stream.chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class BodyReader:
    """Reads POST bodies within the serving limits: JSON Content-Type only (415), at most
    ``max_body_bytes`` (413), the whole body within ``body_timeout_s`` of the headers (408), and at
    most half the ``control_slots`` reading at once (503), so slow senders cannot take the slots
    health checks need."""

    def __init__(self, serving: Any) -> None:
        self.serving = serving
        self.max_readers = max(1, serving.control_slots // 2)
        self.reading = 0

    @staticmethod
    def check_content_type(request: Request) -> None:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind not in JSON_TYPES:
            raise ApiError(415, f"Content-Type must be application/json, got {kind or 'none'!r}", param="Content-Type",
                           code="unsupported_media_type")

    async def read(self, request: Request) -> bytes:
        self.check_content_type(request)
        max_body, timeout_s = self.serving.max_body_bytes, self.serving.body_timeout_s
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, f"the request body exceeds {max_body} bytes", param="body", code="payload_too_large")
        if self.reading >= self.max_readers:
            raise overloaded(f"{self.max_readers} requests are already sending their body; retry later",
                             self.serving.retry_after_s)
        self.reading += 1
        body = bytearray()
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in request.stream():
                    body.extend(chunk)
                    if len(body) > max_body:
                        raise ApiError(413, f"the request body exceeds {max_body} bytes", param="body",
                                       code="payload_too_large")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", param="body",
                           code="request_timeout") from None
        finally:
            self.reading -= 1
        return bytes(body)


def build_api(service: RerankService) -> FastAPI:
    """The FastAPI app of the ingress: routes call ``service``; every error is an OpenAI-shaped JSON
    body (``ApiError``), unknown routes included, and an unexpected error is a 500 without a trace.
    A POST whose Content-Type is not JSON is a 415 (so a browser's "simple" cross-origin form
    post cannot reach the model); CORS headers are sent only for ``serving.cors_origins``."""
    api = FastAPI(title="dabon", docs_url=None, redoc_url=None, openapi_url=None)
    serving = service.config.serving
    bodies = BodyReader(serving)
    if serving.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        api.add_middleware(CORSMiddleware, allow_origins=list(serving.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    async def handle(request: Request, endpoint: Any, with_body: bool = True) -> Response:
        try:
            service.check_auth(request.headers.get("authorization"))
            payload = await endpoint(await bodies.read(request)) if with_body else endpoint()
            return event_stream(payload) if isinstance(payload, Stream) else JSONResponse(payload)
        except ApiError as error:
            return error_response(error)
        except Exception:  # noqa: BLE001 - logged here, answered without a trace
            logger.exception("unexpected error in %s", request.url.path)
            return error_response(ApiError(500, "internal error", type="server_error", code="internal_error"))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, service.chat_completion)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, service.completion)

    @api.post("/dabon/v1/score")
    async def score(request: Request) -> Response:
        return await handle(request, service.score)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        return await handle(request, service.models, with_body=False)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        health = service.health()
        headers = {} if health["status"] == "ok" else {"Retry-After": str(max(1, math.ceil(serving.retry_after_s)))}
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503, headers=headers)

    document: dict[str, Any] = {}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        if not document:
            document.update(openapi_document(api))
        return JSONResponse(document)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 404 and request.url.path.rstrip("/") in ("/v1/score", "/score"):
            message += ": Best-of-N scoring is POST /dabon/v1/score (vLLM's /score is a different API)"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    return api


# ----------------------------------------------------------------------------------------
# Serve deployments (thin)
# ----------------------------------------------------------------------------------------


@serve.deployment
class SamplerDeployment:
    """A candidate sampler in a replica (``serve_app.engines``): ``vllm`` (``AsyncLLM``; concurrent
    calls batched by the engine) or ``hf`` (``generate`` in a worker thread, one call at a time)."""

    def __init__(self, model: ModelSpec, generator: GeneratorConfig, threads: int) -> None:
        self.backend = generator.backend
        if generator.backend == "vllm":
            self.sampler: Any = VLLMCandidateSampler(model, generator.options)
        else:
            _set_torch_threads(threads)
            self.sampler = CandidateSampler(model)

    async def sample(self, prompt_ids: list[int], sampling: SamplingConfig) -> dict[str, Any]:
        """See ``serve_app.engines``; a request the engine refuses as invalid is answered
        ``{"error": {"message"}}`` (the ingress's 400), not raised (a 500)."""
        if self.backend == "vllm":
            try:
                return await self.sampler.sample(prompt_ids, sampling)
            except EngineInputError as err:
                return {"error": {"message": str(err)}}
        return await asyncio.to_thread(self.sampler.sample, prompt_ids, sampling)

    async def context_limit(self) -> int | None:
        """The engine's own context length (vLLM's ``max_model_len``; ``None`` for HF ``generate``)."""
        return self.sampler.max_model_len if self.backend == "vllm" else None

    def check_health(self) -> None:
        if self.backend == "vllm":
            self.sampler.check_health()

    def __del__(self) -> None:
        if getattr(self, "backend", None) == "vllm":
            self.sampler.shutdown()


class ScoringError(RuntimeError):
    """Scoring failed for one request of a batch (the message says why)."""


@serve.deployment
class ScorerDeployment:
    """``CandidateScorer`` in a replica; concurrent ``score`` calls are batched with ``@serve.batch``
    (size and wait from the config) and each batch runs in a worker thread so the replica's event
    loop keeps answering health checks and filling the next batch. The thread scores in steps of
    ``step_tokens``; a call that is cancelled (the ingress's deadline passed, or its client left)
    marks its request, which the thread drops at the next step."""

    def __init__(self, spec: ModelSpec, layer: int, batch_tokens: int, max_batch_size: int,
                 batch_wait_timeout_s: float, threads: int, rule: str = "latent_sim", plugins: tuple[str, ...] = (),
                 step_tokens: int | None = None) -> None:
        _set_torch_threads(threads)
        self.scorer = CandidateScorer(spec, layer, batch_tokens, rule, tuple(plugins), step_tokens)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def score(self, prompt_ids: list[int], response_ids: list[list[int]]) -> list[float | None]:
        """The ranking score (``scoring.rule``) of each candidate at the serving layer."""
        cancelled = threading.Event()
        try:
            result = await self._score_batch({"prompt_ids": prompt_ids, "response_ids": response_ids, "cancelled": cancelled})
        except asyncio.CancelledError:
            cancelled.set()  # the worker thread drops this request before its next step
            raise
        if "error" in result:
            raise ScoringError(result["error"])
        return result["scores"]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.scorer.score_many, requests)


@serve.deployment
@serve.ingress()
class IngressDeployment:
    """The HTTP entry: ``RerankService`` behind ``build_api``, calling the two deployment handles.
    The FastAPI app is built per replica (``__serve_build_asgi_app__``). ``token_sha256``: the
    digest of the bearer token resolved where the app was built (``None``: no auth), so every
    replica checks the same token whatever its node's environment. With auth required and no
    digest the replica refuses to start.

    Readiness: every ``serving.readiness_poll_s`` the replica reads Serve's state of the sampler
    and scorer deployments (``serve.status()``); a deployment with ``min_replicas`` >= 1 and no
    running replica (starting, loading its engine, or replacing a dead replica) makes the stage
    unready (``RerankService.set_unready``: ``/healthz`` 503, new requests 503 at once, waiting
    calls answered 503). Once the sampler runs, its engine's own context length is read once
    (``SamplerDeployment.context_limit``)."""

    def __init__(self, app_config: ServeConfig, sampler: DeploymentHandle, scorer: DeploymentHandle,
                 token_sha256: str | None = None) -> None:
        load_plugins(app_config.scoring.plugins)  # the config was validated where the app was built, not here
        if app_config.auth.required and token_sha256 is None:
            raise ConfigError("auth.required is true but the app was built without a token")
        self.sampler = sampler
        self.scorer = scorer
        self.service = RerankService(
            app_config, load_spec_tokenizer(app_config.model), self._sample, self._score,
            token_sha256=token_sha256, max_positions=model_max_positions(app_config.model),
            engine_max_len=configured_engine_max_len(app_config),
        )
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        deployments = app_config.deployments
        self._watched = {stage: name for stage, name, settings in (
            ("sampling", SAMPLER_NAME, deployments.sampler), ("scoring", SCORER_NAME, deployments.scorer))
            if settings.autoscaling_config.min_replicas >= 1}  # a stage scaled to zero starts on demand
        self._seen_running: set[str] = set()
        self._engine_len_known = False
        self.service.set_unready({stage: "starting" for stage in self._watched})
        self._readiness_task = asyncio.get_running_loop().create_task(
            self._follow_readiness(context.app_name, app_config.serving.readiness_poll_s))
        self._drain_task = None
        try:
            control = ray.get_actor(drain_actor_name(context.app_name), namespace=DRAIN_NAMESPACE)
        except ValueError:
            control = None  # not started by `dabon serve`: Serve's graceful shutdown only
        if control is not None:
            self._drain_task = asyncio.get_running_loop().create_task(self._follow_drain(control))
        logger.info("ingress ready: model %s, auth %s, admits %d requests", app_config.serving.model_name,
                    "on" if token_sha256 else "off", self.service.gate.limit)

    async def _follow_drain(self, control: Any) -> None:
        gate = self.service.gate
        while True:
            try:
                gate.draining = await control.report.remote(self.replica, gate.in_flight, gate.draining) or gate.draining
            except ray.exceptions.RayActorError:
                return  # the control actor is gone with its driver
            await asyncio.sleep(DRAIN_POLL_S)

    async def _follow_readiness(self, app_name: str, poll_s: float) -> None:
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                application = status.applications.get(app_name)
                found = application.deployments if application is not None else {}
                unready = {}
                for stage, name in self._watched.items():
                    deployment = found.get(name)
                    if deployment is not None and deployment.replica_states.get("RUNNING", 0) > 0:
                        self._seen_running.add(stage)
                        continue
                    unready[stage] = "replica lost, being replaced" if stage in self._seen_running else "starting"
                if unready.keys() != self.service.unready.keys():
                    logger.info("readiness: %s", ", ".join(f"{k} {v}" for k, v in unready.items()) or "all stages running")
                self.service.set_unready(unready)
                if "sampling" not in unready and not self._engine_len_known:
                    limit = await asyncio.wait_for(self.sampler.context_limit.remote(), timeout=max(2.0, poll_s))
                    self.service.set_engine_max_len(limit)
                    self._engine_len_known = True
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the state is read again at the next poll
                logger.warning("readiness poll failed (%s); keeping the last state", type(err).__name__)
            await asyncio.sleep(poll_s)

    async def _sample(self, prompt_ids: list[int], sampling: SamplingConfig) -> dict[str, Any]:
        response = self.sampler.sample.remote(prompt_ids, sampling)
        try:
            return await response
        except asyncio.CancelledError:  # our deadline passed: stop the replica's work too
            response.cancel()
            raise

    async def _score(self, prompt_ids: list[int], response_ids: list[list[int]]) -> list[float]:
        response = self.scorer.score.remote(prompt_ids, response_ids)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.service)


def check_models(config: ServeConfig) -> None:
    """Fail fast where the app is built: model names that resolve nowhere, a missing adapter (the
    adapter rule evaluation uses, ``actors.models.check_spec``: a directory or a storage URI)."""
    check_spec(config.model, "model")
    if config.generator.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            from actors.sampler import VLLM_INSTALL_HINT

            raise ConfigError(f"generator.backend: vllm: {VLLM_INSTALL_HINT}; or serve with generator.backend=hf")


def with_adapter_prompt(config: ServeConfig, given: bool) -> ServeConfig:
    """``config`` with the adapter's ``prompt.yaml`` as its prompt when the app args gave none
    (``given`` false); the log says which prompt is served and where it differs from the adapter's."""
    prompt, source = resolve_prompt(config.prompt if given else None, config.model.adapter)
    (logger.warning if "differs" in source else logger.info)("serving prompt: %s", source)
    return config if prompt == config.prompt else config.model_copy(update={"prompt": prompt})


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Any:
    """The Serve application for ``args`` (the ``args`` mapping of ``serve_app/config.yaml``, or a
    ``ServeConfig``): sampler and scorer deployments bound to the ingress, each with the options
    of ``serve_app.options.deployment_options``. Without a ``prompt`` section the adapter's
    ``prompt.yaml`` is served (``with_adapter_prompt``). The bearer token is resolved here, once
    (``auth``), and only its digest is bound to the ingress. Raises ``ConfigError`` naming a bad
    key (or a required token that is missing), and ``ModelLoadError`` when a model name resolves
    nowhere (checked here, before any replica starts)."""
    config = absolute_model_paths(parse_app_config(args))
    check_models(config)
    config = with_adapter_prompt(config, given=not isinstance(args, dict) or "prompt" in args)
    token = resolve_api_token(config.auth)
    spec = config.model
    sampler = SamplerDeployment.options(**deployment_options("sampler", config)).bind(
        spec, config.generator, torch_threads(config.deployments.sampler)
    )
    scoring = config.scoring
    scorer = ScorerDeployment.options(**deployment_options("scorer", config)).bind(
        spec, scoring.layer, scoring.batch_tokens, scoring.max_batch_size, scoring.batch_wait_timeout_s,
        torch_threads(config.deployments.scorer), scoring.rule, list(scoring.plugins), scoring.step_tokens,
    )
    return IngressDeployment.options(**deployment_options("ingress", config)).bind(
        config, sampler, scorer, token_digest(token) if token else None
    )
