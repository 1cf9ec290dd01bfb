"""Typed config of the Serve app (the ``args`` of ``serve_app/config.yaml``) and the Serve options
computed from it.

``ServeConfig`` is what ``build_app(args)`` parses: model spec, prompt, sampling defaults and limits,
the serving layer, request limits, auth, and one block per deployment (``ingress``, ``sampler``,
``scorer``) with its ``autoscaling_config``, ``ray_actor_options`` and queue bounds. Every
sub-model forbids unknown keys, so a typo is an error naming the key (Serve itself silently
drops unknown keys in its YAML; see RAY_NOTES.md).

The resource math is a set of small pure functions (``deployment_options``, ``torch_threads``,
``required_cpus``, ``resolve_api_token``) so that it can be unit-tested without Ray.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.config import ConfigError, PromptConfig
from actors.models import EMBEDDED_ALIAS, ModelSpec

# The deployment names Serve shows (``serve status``) and that config overrides refer to.
INGRESS_NAME = "IngressDeployment"
SAMPLER_NAME = "SamplerDeployment"
SCORER_NAME = "ScorerDeployment"
DEPLOYMENT_NAMES = {"ingress": INGRESS_NAME, "sampler": SAMPLER_NAME, "scorer": SCORER_NAME}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(_Strict):
    """The subset of Serve's ``autoscaling_config`` that dabon exposes (same key names).

    ``min_replicas`` / ``initial_replicas`` / ``max_replicas``: replica bounds.
    ``target_ongoing_requests``: ongoing + queued requests per replica the autoscaler aims at.
    ``upscale_delay_s`` / ``downscale_delay_s`` / ``look_back_period_s``: reaction times
    (``None`` keeps Serve's default).
    """

    min_replicas: int = Field(default=1, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)
    look_back_period_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class ActorResources(_Strict):
    """Resources of one replica (Serve's ``ray_actor_options``)."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = Field(default=None, gt=0, description="bytes of memory to reserve per replica")


class DeploymentSettings(_Strict):
    """One deployment: autoscaling, resources and per-replica concurrency.

    ``max_ongoing_requests``: requests a replica runs at once (``None``: the deployment's own
    default, see ``deployment_options``). ``max_queued_requests``: requests each caller (proxy or
    handle) queues for this deployment before it answers 503 (``-1``: unbounded).
    ``torch_threads``: torch intra-op threads per replica (``None``: ``floor(num_cpus)``, at least 1).
    """

    autoscaling_config: AutoscalingOptions = AutoscalingOptions()
    ray_actor_options: ActorResources = ActorResources()
    max_ongoing_requests: int | None = Field(default=None, gt=0)
    max_queued_requests: int = Field(default=-1, ge=-1)
    torch_threads: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _queue_bound(self) -> "DeploymentSettings":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: expected -1 (unbounded) or a positive number")
        return self


# Per-role defaults. A partial block in the config is merged over these, key by key (so setting
# only sampler.ray_actor_options.num_cpus keeps the sampler's autoscaling and queue bound).
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The ingress only parses, tokenizes and awaits handles: like Serve's own proxy it reserves no
    # CPU, so that one sampler and one scorer replica fill a 2-core machine (`serve run` there).
    "ingress": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
        "ray_actor_options": {"num_cpus": 0},
        "max_queued_requests": 128,
    },
    "sampler": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1},
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": 1,
        "max_queued_requests": 64,
    },
    "scorer": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
        "ray_actor_options": {"num_cpus": 1},
        "max_queued_requests": 64,
    },
}


def merge_over(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` deep-merged over ``defaults`` (nested mappings merged key by key)."""
    out = dict(defaults)
    for key, value in given.items():
        out[key] = merge_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeploymentsConfig(_Strict):
    """Settings of the three deployments, each merged over its ``ROLE_DEFAULTS``."""

    ingress: DeploymentSettings = DeploymentSettings.model_validate(ROLE_DEFAULTS["ingress"])
    sampler: DeploymentSettings = DeploymentSettings.model_validate(ROLE_DEFAULTS["sampler"])
    scorer: DeploymentSettings = DeploymentSettings.model_validate(ROLE_DEFAULTS["scorer"])

    @model_validator(mode="before")
    @classmethod
    def _merge_role_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for role, defaults in ROLE_DEFAULTS.items():
            if isinstance(data.get(role), dict):
                merged[role] = merge_over(defaults, data[role])
        return merged


class SamplingSettings(_Strict):
    """Sampling defaults and the bounds a request may ask for.

    ``default_n`` / ``max_n``: candidates per request (the request's ``n``). ``default_max_tokens``
    / ``max_tokens``: new tokens per candidate. ``temperature`` / ``top_p``: defaults a request
    may override. ``seed``: fixed seed when a request gives none (``None``: a fresh random seed per
    request, as OpenAI servers do). ``max_prompt_tokens``: longest prompt (after the chat
    template). ``max_messages``: most chat messages per request.
    """

    default_n: int = Field(default=4, ge=1)
    max_n: int = Field(default=8, ge=1, le=64)
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.7, gt=0, le=2.0)
    top_p: float = Field(default=1.0, gt=0, le=1.0)
    seed: int | None = Field(default=None, ge=0)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    max_messages: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _defaults_within_bounds(self) -> "SamplingSettings":
        if self.default_n > self.max_n:
            raise ValueError(f"default_n ({self.default_n}) must be <= max_n ({self.max_n})")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self


class ScoringSettings(_Strict):
    """The serving layer and how the scorer batches.

    ``layer``: hidden-state index of the latent similarity (paper: 12). ``batch_tokens``: the
    scorer's token budget per forward batch. ``max_batch_size`` / ``batch_wait_timeout_s``:
    ``@serve.batch`` across requests (requests per batch, wait for a batch to fill).
    """

    layer: int = Field(default=12, ge=0)
    batch_tokens: int = Field(default=4096, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)


class ServingSettings(_Strict):
    """Request handling.

    ``model_name``: the id ``/v1/models`` lists and responses carry. ``request_timeout_s``: a
    request that takes longer is cancelled with 504. ``max_in_flight``: requests one ingress
    replica handles at once; more get 503 with ``Retry-After: retry_after_s`` at once instead of
    waiting. ``max_body_bytes``: larger request bodies get 413. ``allow_skip_scoring``: honour
    ``"dabon": {"skip_scoring": true}`` (returns candidate 0 unscored; for benchmarks only, since
    it bypasses the reranker).
    """

    model_name: str = Field(default="dabon-bon", min_length=1)
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_in_flight: int = Field(default=64, ge=1)
    retry_after_s: float = Field(default=2.0, ge=0)
    max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    allow_skip_scoring: bool = False


class AuthSettings(_Strict):
    """Optional bearer-token auth of ``/v1/*`` (``/healthz`` stays open for probes).

    The token is never written in the config itself: ``token_env`` names an environment variable
    of the ingress replica and ``token_file`` a file that holds it (the first one set wins).
    ``required``: refuse to start when neither yields a token.
    """

    token_env: str | None = "DABON_API_KEY"
    token_file: str | None = None
    required: bool = False


class ServeConfig(_Strict):
    """Everything ``build_app`` needs (see the module doc); ``model`` is an ``actors.models.ModelSpec``,
    ``prompt`` the ``PromptConfig`` (system prompt, response prefix) that chat completions and the
    scoring route share."""

    model: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS, adapter="runs/demo/adapter")
    prompt: PromptConfig = PromptConfig()
    sampling: SamplingSettings = SamplingSettings()
    scoring: ScoringSettings = ScoringSettings()
    serving: ServingSettings = ServingSettings()
    auth: AuthSettings = AuthSettings()
    deployments: DeploymentsConfig = DeploymentsConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "ServeConfig":
        if not self.model.has_finetuned:
            raise ValueError(
                "model: serving reranks by latent similarity, which needs a fine-tuned model: give model.adapter "
                "(e.g. from `dabon random-adapter --out runs/demo/adapter`) or model.finetuned"
            )
        sampler = self.deployments.sampler
        if sampler.max_ongoing_requests not in (None, 1):
            raise ValueError(
                "deployments.sampler.max_ongoing_requests: must be 1; the hf backend seeds torch's global RNG per "
                "call, so concurrent calls in one replica would change each other's samples (scale with replicas)"
            )
        scorer = self.deployments.scorer
        if scorer.max_ongoing_requests is not None and scorer.max_ongoing_requests < self.scoring.max_batch_size:
            raise ValueError(
                f"deployments.scorer.max_ongoing_requests ({scorer.max_ongoing_requests}) must be >= "
                f"scoring.max_batch_size ({self.scoring.max_batch_size}), or batches never fill"
            )
        ingress = self.deployments.ingress
        if ingress.max_ongoing_requests is not None and ingress.max_ongoing_requests < self.serving.max_in_flight:
            raise ValueError(
                f"deployments.ingress.max_ongoing_requests ({ingress.max_ongoing_requests}) must be >= "
                f"serving.max_in_flight ({self.serving.max_in_flight}), or requests queue unseen at the proxy"
            )
        return self


# ----------------------------------------------------------------------------------------
# Resource math (pure)
# ----------------------------------------------------------------------------------------


def max_ongoing_requests(role: str, config: ServeConfig) -> int:
    """Requests one replica of ``role`` (ingress, sampler, scorer) runs at once.

    Explicit values win. Defaults: the sampler runs one generation at a time (see
    ``ServeConfig``); the scorer holds two batches (one running, one filling), so it is always
    >= ``max_batch_size`` (Serve's default of 5 would cap every batch at 5); the ingress admits a
    quarter more than ``max_in_flight`` so that its own JSON 503 answers, not the proxy's queue.
    """
    settings: DeploymentSettings = getattr(config.deployments, role)
    if settings.max_ongoing_requests is not None:
        return settings.max_ongoing_requests
    if role == "sampler":
        return 1
    if role == "scorer":
        return 2 * config.scoring.max_batch_size
    if role == "ingress":
        return config.serving.max_in_flight + max(1, math.ceil(config.serving.max_in_flight / 4))
    raise ValueError(f"role: unknown {role!r}; expected ingress, sampler or scorer")


def torch_threads(settings: DeploymentSettings) -> int:
    """torch threads per replica: explicit, else ``floor(num_cpus)``, at least 1."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    return max(1, int(math.floor(settings.ray_actor_options.num_cpus)))


def deployment_options(role: str, config: ServeConfig) -> dict[str, Any]:
    """Keyword arguments of ``Deployment.options(...)`` for ``role`` (ingress, sampler, scorer).

    Returns ``name``, ``autoscaling_config`` (Serve's keys; ``None`` values left to Serve's
    defaults), ``ray_actor_options`` (``num_cpus``, ``num_gpus``, ``memory`` when set),
    ``max_ongoing_requests``, ``max_queued_requests`` and a ``backpressure_config`` that makes a
    full queue answer 503 with ``Retry-After``.
    """
    settings: DeploymentSettings = getattr(config.deployments, role)
    autoscaling = {key: value for key, value in settings.autoscaling_config.model_dump().items() if value is not None}
    resources = {key: value for key, value in settings.ray_actor_options.model_dump().items() if value is not None}
    return {
        "name": DEPLOYMENT_NAMES[role],
        "autoscaling_config": autoscaling,
        "ray_actor_options": resources,
        "max_ongoing_requests": max_ongoing_requests(role, config),
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": config.serving.retry_after_s},
    }


def required_cpus(config: ServeConfig, at: str = "max_replicas") -> float:
    """Logical CPUs the app holds with every deployment at ``min_replicas`` or ``max_replicas``."""
    if at not in ("min_replicas", "max_replicas"):
        raise ValueError(f"at: expected min_replicas or max_replicas, got {at!r}")
    total = 0.0
    for role in DEPLOYMENT_NAMES:
        settings: DeploymentSettings = getattr(config.deployments, role)
        replicas = max(getattr(settings.autoscaling_config, at), 1 if at == "max_replicas" else 0)
        total += replicas * settings.ray_actor_options.num_cpus
    return total


def resolve_api_token(auth: AuthSettings, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token from ``auth.token_env`` (in ``environ``, default ``os.environ``) or
    ``auth.token_file``; ``None`` when neither is set. Raises ``ConfigError`` when ``auth.required``
    and no token is found, or when ``token_file`` is named but unreadable or empty."""
    environ = os.environ if environ is None else environ
    if auth.token_env and environ.get(auth.token_env, "").strip():
        return environ[auth.token_env].strip()
    if auth.token_file:
        path = Path(auth.token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"auth.token_file: cannot read {str(path)!r}: {err.strerror}") from None
        if not token:
            raise ConfigError(f"auth.token_file: {str(path)!r} is empty")
        return token
    if auth.required:
        raise ConfigError(
            f"auth.required is true but no token was found: set the environment variable {auth.token_env!r} "
            "or auth.token_file"
        )
    return None
