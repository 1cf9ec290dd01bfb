"""The Ray Serve app: an OpenAI-compatible ingress, a sampler and a batching scorer deployment.

Launch::

    dabon random-adapter --out runs/demo/adapter           # once: a random (untrained) adapter
    dabon serve --adapter runs/demo/adapter                 # local Ray, http://127.0.0.1:8000
    serve run serve_app/config.yaml                         # the same app through Serve's CLI
    serve deploy serve_app/config.yaml --address http://127.0.0.1:8265   # onto a running cluster
    kubectl apply -f deploy/rayservice.yaml                 # KubeRay RayService

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "n": 4, "dabon": {"return_candidates": true}}'

Request flow: ``IngressDeployment`` (FastAPI, ``serve_app.service.RerankService``) validates the
request and builds the prompt ids once (``actors.chat``: user text never becomes control
tokens); ``SamplerDeployment`` generates N candidates from those ids and returns their exact
token ids; ``ScorerDeployment`` scores the same prompt ids + generated ids (latent similarity at
the serving layer), batching concurrent requests with ``@serve.batch``; the ingress returns the
argmin candidate. Each deployment's autoscaling, resources and queue bounds come from the
config (``serve_app.options``).

``CandidateSampler`` and ``CandidateScorer`` are the plain classes (no Ray); the
``*Deployment`` classes only add Serve options, threads and batching.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.config import validate
from actors.models import ModelLoadError, ModelSpec, hub_offline, load_models, load_spec_tokenizer, local_model_dir, resolve_model
from actors.sampler import HFBackend, Sampler, SamplingConfig
from actors.scorer import AttributionScorer, ScorerConfig
from actors.settings import get_logger
from serve_app.options import ServeConfig, deployment_options, resolve_api_token, torch_threads
from serve_app.schemas import ApiError, error_body
from serve_app.service import RerankService

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------
# Plain logic (no Ray)
# ----------------------------------------------------------------------------------------


class CandidateSampler:
    """N candidates for one prompt, given as token ids, with the ``hf`` backend of ``actors.sampler``.

    ``spec``: the served model (the fine-tuned view generates). ``sample(prompt_ids, sampling)``
    takes a ``SamplingConfig`` as a dict and returns ``{"texts", "token_ids", "finish_reasons"}``,
    N each, with the exact generated ids (no stop token, no padding).
    """

    def __init__(self, spec: ModelSpec) -> None:
        bundle = load_models(spec)
        self.backend = HFBackend(bundle)
        self.tokenizer = bundle.tokenizer

    def sample(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, list[Any]]:
        """See class doc."""
        sampler = Sampler(self.backend, self.tokenizer, SamplingConfig(**sampling))  # ids pass through the prompt config
        (samples,) = sampler.sample_with_ids([list(prompt_ids)]).samples  # ids pass through unchanged
        return {
            "texts": [sample.text for sample in samples],
            "token_ids": [list(sample.token_ids or []) for sample in samples],
            "finish_reasons": [sample.finish_reason for sample in samples],
        }


class CandidateScorer:
    """Latent similarity at one layer for many (prompt ids, candidate ids) requests at once.

    ``spec``: the served model (adapter or full fine-tuned copy); ``layer``: the serving layer;
    ``batch_tokens``: the scorer's forward-batch budget. ``score_many(requests)`` takes dicts with
    ``prompt_ids`` and ``response_ids`` and returns, per request, ``{"latent_sim": [N floats]}``
    or ``{"error": message}`` (one bad request does not fail the others of its batch).
    """

    def __init__(self, spec: ModelSpec, layer: int, batch_tokens: int = 4096) -> None:
        self.layer = layer
        self.scorer = AttributionScorer.from_spec(spec, ScorerConfig(layers=(layer,), batch_tokens=batch_tokens))

    def score_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """See class doc."""
        prompt_ids = [list(request["prompt_ids"]) for request in requests]
        response_ids = [[list(ids) for ids in request["response_ids"]] for request in requests]
        try:
            results = self.scorer.score_ids(prompt_ids, response_ids)
            return [{"latent_sim": result["latent_sim"][self.layer]} for result in results]
        except Exception:  # noqa: BLE001 - retried one by one so that only the bad request fails
            if len(requests) == 1:
                raise
        out = []
        for prompt, candidates in zip(prompt_ids, response_ids, strict=True):
            try:
                (result,) = self.scorer.score_ids([prompt], [candidates])
                out.append({"latent_sim": result["latent_sim"][self.layer]})
            except Exception as err:  # noqa: BLE001 - reported to that request's caller
                out.append({"error": f"{type(err).__name__}: {err}"})
        return out


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


def build_api(service: RerankService) -> FastAPI:
    """The FastAPI app of the ingress: routes call ``service``; every error is an OpenAI-shaped JSON
    body (``ApiError``), unknown routes included, and an unexpected error is a 500 without a trace."""
    api = FastAPI(title="dabon", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = service.config.serving.max_body_bytes

    def answer(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, f"the request body exceeds {max_body} bytes", param="body", code="payload_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_body:
                raise ApiError(413, f"the request body exceeds {max_body} bytes", param="body", code="payload_too_large")
        return bytes(body)

    async def handle(request: Request, endpoint: Any, with_body: bool = True) -> JSONResponse:
        try:
            service.check_auth(request.headers.get("authorization"))
            payload = await endpoint(await read_body(request)) if with_body else endpoint()
            return JSONResponse(payload)
        except ApiError as error:
            return answer(error)
        except Exception:  # noqa: BLE001 - logged here, answered without a trace
            logger.exception("unexpected error in %s", request.url.path)
            return answer(ApiError(500, "internal error", type="server_error", code="internal_error"))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        return await handle(request, service.chat_completion)

    @api.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        return await handle(request, service.score)

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return await handle(request, service.models, with_body=False)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(service.health())

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    return api


# ----------------------------------------------------------------------------------------
# Serve deployments (thin)
# ----------------------------------------------------------------------------------------


@serve.deployment
class SamplerDeployment:
    """``CandidateSampler`` in a replica; ``sample`` runs in Serve's thread pool, one call at a time
    (``max_ongoing_requests=1``, see ``serve_app.options``)."""

    def __init__(self, spec: dict[str, Any], threads: int) -> None:
        _set_torch_threads(threads)
        self.sampler = CandidateSampler(ModelSpec(**spec))

    def sample(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, list[Any]]:
        """See ``CandidateSampler.sample``."""
        return self.sampler.sample(prompt_ids, sampling)


class ScoringError(RuntimeError):
    """Scoring failed for one request of a batch (the message says why)."""


@serve.deployment
class ScorerDeployment:
    """``CandidateScorer`` in a replica; concurrent ``score`` calls are batched with ``@serve.batch``
    (size and wait from the config) and each batch runs in a worker thread so the replica's event
    loop keeps answering health checks and filling the next batch."""

    def __init__(self, spec: dict[str, Any], layer: int, batch_tokens: int, max_batch_size: int,
                 batch_wait_timeout_s: float, threads: int) -> None:
        _set_torch_threads(threads)
        self.scorer = CandidateScorer(ModelSpec(**spec), layer, batch_tokens)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def score(self, prompt_ids: list[int], response_ids: list[list[int]]) -> list[float]:
        """Latent similarity of each candidate at the serving layer."""
        result = await self._score_batch({"prompt_ids": prompt_ids, "response_ids": response_ids})
        if "error" in result:
            raise ScoringError(result["error"])
        return result["latent_sim"]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.scorer.score_many, requests)


@serve.deployment
@serve.ingress()
class IngressDeployment:
    """The HTTP entry: ``RerankService`` behind ``build_api``, calling the two deployment handles.
    The FastAPI app is built per replica (``__serve_build_asgi_app__``), from this replica's config
    and token, rather than at import time."""

    def __init__(self, config: dict[str, Any], sampler: DeploymentHandle, scorer: DeploymentHandle) -> None:
        app_config = ServeConfig.model_validate(config)
        self.sampler = sampler
        self.scorer = scorer
        token = resolve_api_token(app_config.auth)
        self.service = RerankService(
            app_config, load_spec_tokenizer(app_config.model), self._sample, self._score,
            api_token=token, max_positions=model_max_positions(app_config.model),
        )
        logger.info("ingress ready: model %s, auth %s", app_config.serving.model_name, "on" if token else "off")

    async def _sample(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
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


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Any:
    """The Serve application for ``args`` (the ``args`` mapping of ``serve_app/config.yaml``, or a
    ``ServeConfig``): sampler and scorer deployments bound to the ingress, each with the options
    of ``serve_app.options.deployment_options``. Raises ``ConfigError`` naming a bad key, and
    ``ModelLoadError`` when a model name resolves nowhere (checked here, before any replica starts)."""
    config = absolute_model_paths(parse_app_config(args))
    for name in (config.model.base, config.model.finetuned):
        if name:
            resolve_model(name)
    if config.model.adapter and not Path(config.model.adapter).expanduser().is_dir():
        raise ModelLoadError(
            f"model.adapter {config.model.adapter!r} is not a directory (relative paths are taken from {Path.cwd()}); "
            "create a random one for trying things out with: dabon random-adapter --out runs/demo/adapter"
        )
    spec = config.model.model_dump(mode="json")
    sampler = SamplerDeployment.options(**deployment_options("sampler", config)).bind(
        spec, torch_threads(config.deployments.sampler)
    )
    scoring = config.scoring
    scorer = ScorerDeployment.options(**deployment_options("scorer", config)).bind(
        spec, scoring.layer, scoring.batch_tokens, scoring.max_batch_size, scoring.batch_wait_timeout_s,
        torch_threads(config.deployments.scorer),
    )
    ingress_options = deployment_options("ingress", config)
    return IngressDeployment.options(**ingress_options).bind(config.model_dump(mode="json"), sampler, scorer)
