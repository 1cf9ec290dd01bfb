"""Typed config of the Serve app (the ``args`` of ``serve_app/config.yaml``) and the Serve options
computed from it.

``ServeConfig`` is what ``build_app(args)`` parses: model spec, prompt, the sampler engine
(``generator``: ``vllm`` or ``hf``), sampling defaults and limits, the serving layer, request
limits, auth, and one block per deployment (``ingress``, ``sampler``, ``scorer``) with its
``autoscaling_config``, ``ray_actor_options`` and queue bounds. Every sub-model forbids unknown
keys, so a typo is an error naming the key (Serve itself silently drops unknown keys in its YAML;
see RAY_NOTES.md).

Admission follows capacity (``admission_limits``): a sampler replica runs
``max_ongoing_requests`` requests at once (hf: 1, one ``generate`` at a time; vllm: 8, batched
continuously by the engine), the app admits twice what all sampler replicas run (one running and
one waiting per slot), and past that a request gets a 503 with ``Retry-After`` at once.

The resource math is a set of small pure functions (``deployment_options``, ``admission_limits``,
``torch_threads``, ``required_cpus``, ``resolve_api_token``) so that it can be unit-tested
without Ray.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.config import ConfigError, PromptConfig, refuse_renamed
from actors.models import EMBEDDED_ALIAS, ModelSpec
from actors.sampler import MIN_TEMPERATURE, GeneratorConfig, SamplingFields
from actors.scores import ScoreError, load_plugins, registered
from actors.selection import check_threshold

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
    default, see ``max_ongoing_requests``). ``max_queued_requests``: requests each caller (proxy or
    handle) queues for this deployment before it answers 503 (``-1``: unbounded; ``None``: the
    role's default, for the sampler what the ingress replicas admit, see ``admission_limits``).
    ``torch_threads``: torch intra-op threads per replica (``None``: ``floor(num_cpus)``, at least 1).
    """

    autoscaling_config: AutoscalingOptions = AutoscalingOptions()
    ray_actor_options: ActorResources = ActorResources()
    max_ongoing_requests: int | None = Field(default=None, gt=0)
    max_queued_requests: int | None = Field(default=-1, ge=-1)
    torch_threads: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _queue_bound(self) -> "DeploymentSettings":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: expected -1 (unbounded) or a positive number")
        return self


# Per-role defaults. A partial block in the config is merged over these, key by key (so setting
# only sampler.ray_actor_options.num_cpus keeps the sampler's autoscaling and queue bound).
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The ingress only parses, tokenizes (in a worker thread) and awaits handles: like Serve's own
    # proxy it reserves no CPU, so that one sampler and one scorer replica fill a 2-core machine.
    # One replica: the admission limit is split across max_replicas ingress replicas.
    "ingress": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 32},
        "ray_actor_options": {"num_cpus": 0},
        "max_queued_requests": 128,
    },
    "sampler": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1},
        "ray_actor_options": {"num_cpus": 1},
        "max_queued_requests": None,
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


# Former keys of ``sampling`` (before issue 15's one vocabulary) and their names now.
RENAMED_SAMPLING_KEYS = {"candidates": "n", "max_candidates": "max_n", "default_max_tokens": "max_new_tokens",
                         "max_tokens": "max_new_tokens_limit"}


class SamplingSettings(SamplingFields):
    """The server's sampling defaults and the bounds a request may ask for: evaluation's
    ``SamplingFields`` (``n``, ``temperature``, ``top_p``, ``max_new_tokens``, the same names and
    checks) as defaults, plus the server's limits.

    ``n``: Best-of-N candidates sampled per request (a request may ask for another count with
    ``dabon.candidates``, or ``best_of`` on ``/v1/completions``, up to ``max_n``); a request's
    OpenAI ``n`` is the number of ranked choices returned, at most the candidate count (when it
    asks for more choices than ``n``, as many candidates are sampled). ``max_n`` also bounds the
    responses of one ``/dabon/v1/score`` request. ``max_new_tokens``: new tokens per candidate
    when a request sends no ``max_tokens`` / ``max_completion_tokens``; ``max_new_tokens_limit``:
    the most a request may ask for (and the longest response ``/dabon/v1/score`` takes).
    ``temperature`` / ``top_p``: defaults a request may override (a temperature must be 0, greedy,
    or at least ``MIN_TEMPERATURE`` = 0.01: smaller ones underflow the sampler, and vLLM would
    raise them to 0.01 without a word; the default itself is at least 0.01). ``seed``: fixed seed
    when a request gives none (``None``: a fresh random seed per request, as OpenAI servers do).
    ``max_prompt_chars``: characters of all message contents (or a raw prompt), checked before
    tokenization. ``max_prompt_tokens``: longest prompt after the chat template.
    ``max_messages``: most chat messages per request. The keys' former names (``candidates``,
    ``max_candidates``, ``default_max_tokens``, ``max_tokens``) are refused with the new one named.
    """

    temperature: float = Field(default=0.7, ge=MIN_TEMPERATURE, le=2.0)
    seed: int | None = Field(default=None, ge=0)
    max_n: int = Field(default=8, ge=1, le=64)
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    max_prompt_chars: int = Field(default=32768, ge=1)
    max_prompt_tokens: int = Field(default=2048, ge=1)
    max_messages: int = Field(default=64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return refuse_renamed(data, RENAMED_SAMPLING_KEYS)

    @model_validator(mode="after")
    def _defaults_within_bounds(self) -> "SamplingSettings":
        if self.n > self.max_n:
            raise ValueError(f"n: {self.n} is more than max_n ({self.max_n})")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} is more than max_new_tokens_limit "
                             f"({self.max_new_tokens_limit})")
        return self


class ScoringSettings(_Strict):
    """What candidates are ranked by, at which layer, and how the scorer batches.

    ``rule``: the registered score (``actors.scores``) candidates are ranked by, in its own
    direction (default ``latent_sim``, the paper's argmin latent similarity); ``plugins``:
    ``"module:Class"`` import paths of scores of your own, registered in every replica (so
    ``rule`` may name one). ``layer``: hidden-state index of per-layer scores (paper: 12).
    ``batch_tokens``: the scorer's token budget per forward batch. ``max_batch_size`` /
    ``batch_wait_timeout_s``: ``@serve.batch`` across requests (requests per batch, wait for a
    batch to fill). ``step_tokens``: the scorer works in steps of at most this many tokens
    (``None``: ``batch_tokens``); a request that timed out or whose client left is dropped between
    steps. ``max_request_tokens``: the most tokens (prompt + all responses) one
    ``/dabon/v1/score`` request may ask to score. ``threshold``: ``null`` ranks by ``rule`` as it
    is; a finite number >= 0 applies its budgeted form (``actors.selection.budgeted_choice``): the
    score decides only where its spread over the non-empty candidates is at least this, otherwise
    the first non-empty sample is returned (``dabon budget`` chooses it for an over-refusal budget).
    """

    rule: str = "latent_sim"
    threshold: float | None = None
    plugins: tuple[str, ...] = ()
    layer: int = Field(default=12, ge=0)
    batch_tokens: int = Field(default=4096, gt=0)
    step_tokens: int | None = Field(default=None, gt=0)
    max_request_tokens: int = Field(default=8192, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)

    @model_validator(mode="after")
    def _rule_registered(self) -> "ScoringSettings":
        try:
            load_plugins(self.plugins)
        except ScoreError as err:
            raise ValueError(f"plugins: {err}") from None
        if self.rule not in registered():
            raise ValueError(f"rule: unknown score {self.rule!r}; expected one of {', '.join(registered())} "
                             "(or a score of scoring.plugins)")
        if self.threshold is not None:
            check_threshold(self.threshold, "threshold")
        return self


class ServingSettings(_Strict):
    """Request handling.

    ``model_name``: the id ``/v1/models`` lists and responses carry. ``request_timeout_s``: a
    request that takes longer is cancelled with 504. ``max_in_flight``: requests one ingress
    replica works on at once (``None``: derived from the sampler's capacity, see
    ``admission_limits``); more get 503 with ``Retry-After: retry_after_s`` at once instead of
    waiting. ``max_body_bytes``: larger request bodies get 413 before they are read.
    ``allow_skip_scoring``: honour ``"dabon": {"skip_scoring": true}`` (returns the candidates in
    sampling order, unscored; for benchmarks only, since it bypasses the reranker).
    ``cors_origins``: origins allowed to call the API from a browser (empty: no CORS headers, so
    browsers refuse cross-origin calls). ``drain_timeout_s``: on SIGTERM ``dabon serve`` stops
    admitting (503) and waits up to this long for requests in flight; Serve also waits this long
    for a replica's requests before it stops one (scale-down, redeploy).
    ``body_timeout_s``: a client must have sent its whole request body within this long after its
    headers, or it gets 408 (slow senders cannot hold the ingress). ``control_slots``: requests an
    ingress replica takes beyond what it admits (Serve's ``max_ongoing_requests`` of the ingress),
    so that ``/healthz``, ``/v1/models``, bodies being read and fast refusals are never queued
    behind admitted work; at most half of them may be reading a body at once (more get 503).
    ``readiness_poll_s``: how often an ingress replica reads Serve's state of the sampler and
    scorer deployments; while one of them (with ``min_replicas`` >= 1) has no running replica,
    ``/healthz`` answers 503 and requests get 503 with ``Retry-After`` at once, and requests
    waiting for that deployment are answered 503 too. ``health_check_period_s``: Serve's health
    check period of the sampler and scorer replicas (how soon a dead replica is noticed).
    ``target_latency_s``: admit a request only while the measured cost of both stages predicts it
    finishes within this many seconds (``serve_app.service.AdmissionGate``; ``None``: only
    ``max_in_flight`` bounds admission).
    """

    model_name: str = Field(default="dabon-bon", min_length=1)
    request_timeout_s: float = Field(default=120.0, gt=0)
    max_in_flight: int | None = Field(default=None, ge=1)
    retry_after_s: float = Field(default=2.0, ge=0)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    allow_skip_scoring: bool = False
    cors_origins: list[str] = []
    drain_timeout_s: float = Field(default=30.0, ge=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    control_slots: int = Field(default=32, ge=2)
    readiness_poll_s: float = Field(default=1.0, gt=0)
    health_check_period_s: float = Field(default=2.0, gt=0)
    target_latency_s: float | None = Field(default=None, gt=0)


class AuthSettings(_Strict):
    """Optional bearer-token auth of ``/v1/*`` and ``/dabon/*`` (``/healthz`` stays open for probes).

    The token is never written in the config itself: ``token_env`` names an environment variable
    and ``token_file`` a file that holds it (the first one set wins), both read once where the app
    is built (``build_app``: the ``dabon serve`` or ``serve run`` process, or the cluster task
    of ``serve deploy``). Only the token's SHA-256 digest travels to the ingress replicas, so
    every replica checks the same token whatever node it runs on and whatever environment that
    node has. ``required``: refuse to start when neither yields a token.
    """

    token_env: str | None = "DABON_API_KEY"
    token_file: str | None = None
    required: bool = False


class ServeConfig(_Strict):
    """Everything ``build_app`` needs (see the module doc); ``model`` is an ``actors.models.ModelSpec``,
    ``prompt`` the ``PromptConfig`` (system prompt, response prefix) that chat completions and the
    scoring route share, ``generator`` the sampler engine (``actors.sampler.GeneratorConfig``:
    ``vllm`` with ``VLLMOptions``, or ``hf``)."""

    model: ModelSpec = ModelSpec(base=EMBEDDED_ALIAS, adapter="runs/demo/adapter")
    prompt: PromptConfig = PromptConfig()
    generator: GeneratorConfig = GeneratorConfig(backend="vllm")
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
        if self.generator.backend not in SERVE_BACKENDS:
            raise ValueError(
                f"generator.backend: {self.generator.backend!r} cannot serve; expected one of {', '.join(SERVE_BACKENDS)} "
                "(the scorer needs the exact token ids of every candidate)"
            )
        scorer = self.deployments.scorer
        if scorer.max_ongoing_requests is not None and scorer.max_ongoing_requests < self.scoring.max_batch_size:
            raise ValueError(
                f"deployments.scorer.max_ongoing_requests: {scorer.max_ongoing_requests} is less than "
                f"scoring.max_batch_size ({self.scoring.max_batch_size}), so batches never fill"
            )
        ingress = self.deployments.ingress
        admitted = admission_limits(self)["ingress_in_flight"]
        if ingress.max_ongoing_requests is not None and ingress.max_ongoing_requests < admitted:
            raise ValueError(
                f"deployments.ingress.max_ongoing_requests: {ingress.max_ongoing_requests} is less than the "
                f"{admitted} requests an ingress replica admits (serving.max_in_flight), so requests would queue "
                "unseen at the proxy"
            )
        return self


SERVE_BACKENDS = ("vllm", "hf")


# ----------------------------------------------------------------------------------------
# Resource math (pure)
# ----------------------------------------------------------------------------------------


SAMPLER_CONCURRENCY = {"hf": 1, "vllm": 8}


def max_ongoing_requests(role: str, config: ServeConfig) -> int:
    """Requests one replica of ``role`` (ingress, sampler, scorer) runs at once.

    Explicit values win. Defaults: a sampler replica runs ``SAMPLER_CONCURRENCY`` of its backend
    (hf: one ``generate`` at a time, so a second request would only split the CPU; vllm: 8
    requests, N sequences each, batched by the engine); the scorer holds two batches (one running,
    one filling), so it is always >= ``max_batch_size``; the ingress takes ``serving.control_slots``
    more than it admits, so that its own JSON 503 answers, not the proxy's queue, and health checks,
    model listing and bodies being read never wait behind admitted work.
    """
    settings: DeploymentSettings = getattr(config.deployments, role)
    if settings.max_ongoing_requests is not None:
        return settings.max_ongoing_requests
    if role == "sampler":
        return SAMPLER_CONCURRENCY[config.generator.backend]
    if role == "scorer":
        return 2 * config.scoring.max_batch_size
    if role == "ingress":
        return admission_limits(config)["ingress_in_flight"] + config.serving.control_slots
    raise ValueError(f"role: unknown {role!r}; expected ingress, sampler or scorer")


def admission_limits(config: ServeConfig) -> dict[str, int]:
    """How many requests the app takes in before it answers 503.

    ``sampler_capacity``: requests all sampler replicas run at once at ``max_replicas``
    (replicas x ``max_ongoing_requests``). ``ingress_in_flight``: requests one ingress replica
    admits, ``serving.max_in_flight`` or twice the sampler capacity split over the ingress's
    ``max_replicas`` (one request running and one waiting per sampler slot; at most that many
    wait). ``sampler_queue``: what each caller may queue at the sampler: what all ingress replicas
    admit together, a backstop that never refuses before the ingress gate does (Serve's queue
    bound can refuse requests that arrive at the same moment below its limit).
    """
    sampler = config.deployments.sampler
    per_replica = sampler.max_ongoing_requests or SAMPLER_CONCURRENCY[config.generator.backend]
    capacity = sampler.autoscaling_config.max_replicas * per_replica
    ingress_replicas = config.deployments.ingress.autoscaling_config.max_replicas
    in_flight = config.serving.max_in_flight or max(1, math.ceil(2 * capacity / ingress_replicas))
    queue = sampler.max_queued_requests if sampler.max_queued_requests is not None else in_flight * ingress_replicas
    return {"sampler_capacity": capacity, "ingress_in_flight": in_flight, "sampler_queue": queue}


def torch_threads(settings: DeploymentSettings) -> int:
    """torch threads per replica: explicit, else ``floor(num_cpus)``, at least 1."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    return max(1, int(math.floor(settings.ray_actor_options.num_cpus)))


def deployment_options(role: str, config: ServeConfig) -> dict[str, Any]:
    """Keyword arguments of ``Deployment.options(...)`` for ``role`` (ingress, sampler, scorer).

    Returns ``name``, ``autoscaling_config`` (Serve's keys; ``None`` values left to Serve's
    defaults), ``ray_actor_options`` (``num_cpus``, ``num_gpus``, ``memory`` when set),
    ``max_ongoing_requests``, ``max_queued_requests``, a ``backpressure_config`` that makes a
    full queue answer 503 with ``Retry-After``, and ``graceful_shutdown_timeout_s``
    (``serving.drain_timeout_s``: a stopping replica finishes its requests first). A vLLM sampler
    over several GPUs (tensor x pipeline parallel > 1) gets a placement group instead of
    ``num_gpus``: one bundle for the replica, one GPU bundle per engine worker, packed on one node.
    """
    settings: DeploymentSettings = getattr(config.deployments, role)
    autoscaling = {key: value for key, value in settings.autoscaling_config.model_dump().items() if value is not None}
    resources = {key: value for key, value in settings.ray_actor_options.model_dump().items() if value is not None}
    queued = settings.max_queued_requests
    if role == "sampler":
        queued = admission_limits(config)["sampler_queue"]
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAMES[role],
        "autoscaling_config": autoscaling,
        "ray_actor_options": resources,
        "max_ongoing_requests": max_ongoing_requests(role, config),
        "max_queued_requests": -1 if queued is None else queued,
        "backpressure_config": {"status_code": 503, "retry_after_s": config.serving.retry_after_s},
        "graceful_shutdown_timeout_s": config.serving.drain_timeout_s,
    }
    if role in ("sampler", "scorer"):
        options["health_check_period_s"] = config.serving.health_check_period_s
    if role == "sampler" and config.generator.backend == "vllm":
        engine = config.generator.options
        workers = engine.tensor_parallel_size * engine.pipeline_parallel_size
        if workers > 1:
            resources = dict(resources)
            resources.pop("num_gpus", None)
            options["ray_actor_options"] = resources
            options["placement_group_bundles"] = [{"CPU": resources.get("num_cpus", 1)}] + [{"GPU": 1}] * workers
            options["placement_group_strategy"] = "STRICT_PACK"
    return options


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


def token_digest(token: str) -> str:
    """The SHA-256 hex digest the ingress compares presented tokens against."""
    return hashlib.sha256(token.encode()).hexdigest()


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
