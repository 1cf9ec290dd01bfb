"""serve_app/config.yaml and deploy/rayservice.yaml: valid for the installed Ray Serve, with no
key that Serve would drop silently, and app args that ``ServeConfig`` accepts, each value they
state either ``ServeConfig``'s default or a listed, commented override (``OVERRIDES``), so that
the serving defaults live in one place. Nothing starts.

Serve's schema models (``ray.serve.schema``) ignore unknown keys ("forward compatible"), so a
misspelt ``autoscaling_config`` key or ``request_timeout`` would be dropped without a word
(RAY_NOTES.md). ``unknown_keys`` walks a config along the schema models' fields and reports
every key that no field takes; the tests then also validate with the models themselves.
"""

from __future__ import annotations

import copy
import importlib
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import ray
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema
from serve_app.options import ServeConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_YAML = REPO / "serve_app" / "config.yaml"
MANIFEST = REPO / "deploy" / "rayservice.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"

# Fields of KubeRay's ray.io/v1 RayServiceSpec and RayClusterSpec (KubeRay v1.5 API reference).
RAYSERVICE_SPEC_KEYS = {
    "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc",
    "rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
}
RAYCLUSTER_SPEC_KEYS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions",
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models inside a field annotation (through Optional, Union, List, Dict values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin in (dict, typing.Dict):
        args = args[1:]
    out = []
    for arg in args:
        out.extend(_models_in(arg))
    return out


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Dotted paths of keys in ``data`` that ``model`` (recursively) has no field for.

    Free-form dicts (``args``, ``user_config``) are not descended into; ``runtime_env`` keys are
    checked against ``RuntimeEnv.known_fields``.
    """
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    problems = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(where)
            continue
        if key == "runtime_env" and isinstance(value, dict):
            problems.extend(f"{where}.{k}" for k in value if k not in RuntimeEnv.known_fields)
            continue
        models = _models_in(fields[key].annotation)
        if not models:
            continue
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            item_path = f"{where}[{index}]" if isinstance(value, list) else where
            # a union of models: the item fits if any member takes all its keys
            candidates = [unknown_keys(item, m, item_path) for m in models]
            problems.extend(min(candidates, key=len))
    return problems


def check_serve_config(data: dict[str, Any]) -> ServeDeploySchema:
    """Strict keys, then Serve's own validation, then each application's args as ServeConfig."""
    assert unknown_keys(data, ServeDeploySchema) == []
    schema = ServeDeploySchema.model_validate(data)
    for application in data["applications"]:
        ServeConfig.model_validate(application.get("args") or {})
    return schema


@pytest.fixture
def serve_config() -> dict[str, Any]:
    return yaml.safe_load(CONFIG_YAML.read_text())


@pytest.fixture
def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


# ---------------------------------------------------------------------------------------- config.yaml


def test_config_yaml_is_a_strict_serve_config(serve_config):
    schema = check_serve_config(serve_config)
    assert schema.http_options.host == "127.0.0.1"  # loopback for local runs (RAY_NOTES)
    (application,) = schema.applications
    assert application.name == "dabon"
    module, _, attribute = application.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    args = ServeConfig.model_validate(application.args)
    # the proxy's timeout leaves the ingress room to answer its own 504 first
    assert schema.http_options.request_timeout_s > args.serving.request_timeout_s


def test_config_yaml_args_reach_the_deployments(serve_config):
    from serve_app.options import deployment_options

    args = ServeConfig.model_validate(serve_config["applications"][0]["args"])
    raw = serve_config["applications"][0]["args"]["deployments"]
    for role in ("ingress", "sampler", "scorer"):
        options = deployment_options(role, args)
        for key, value in raw[role]["autoscaling_config"].items():
            assert options["autoscaling_config"][key] == value
        assert options["ray_actor_options"]["num_cpus"] == raw[role]["ray_actor_options"]["num_cpus"]
    assert deployment_options("scorer", args)["max_ongoing_requests"] >= args.scoring.max_batch_size


# The values the shipped files state that differ from the app's defaults (``ServeConfig``'s, with
# ``ROLE_DEFAULTS`` for the deployments), each commented in its file as a deliberate override.
# Every other value a file states must equal the default: the defaults live in one place
# (serve_app/options.py), and a default changed there cannot leave a stale copy in a YAML file.
OVERRIDES = {
    CONFIG_YAML: {
        "generator.options.dtype", "generator.options.max_model_len", "generator.options.enforce_eager",
        "generator.options.cpu_kv_cache_gib", "serving.target_latency_s",
        "deployments.sampler.autoscaling_config.max_replicas", "deployments.sampler.autoscaling_config.target_ongoing_requests",
        "deployments.scorer.torch_threads", "deployments.scorer.max_ongoing_requests",
    },
    MANIFEST: {
        "model.adapter", "generator.backend", "auth.required", "deployments.ingress.ray_actor_options.num_cpus",
        "deployments.sampler.autoscaling_config.max_replicas", "deployments.sampler.ray_actor_options.num_cpus",
        "deployments.sampler.max_ongoing_requests", "deployments.scorer.autoscaling_config.max_replicas",
        "deployments.scorer.ray_actor_options.num_cpus", "deployments.scorer.max_ongoing_requests",
    },
}


def stated_values(data: Any, path: str = "") -> dict[str, Any]:
    """Dotted path -> value of every leaf a mapping states (lists are leaves)."""
    if not isinstance(data, dict):
        return {path: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(stated_values(value, f"{path}.{key}" if path else str(key)))
    return out


def app_args_of(path: Path) -> dict[str, Any]:
    """The dabon application's ``args`` in serve_app/config.yaml or in deploy/rayservice.yaml's
    embedded Serve config."""
    data = yaml.safe_load(path.read_text())
    if path == MANIFEST:
        data = yaml.safe_load(data["spec"]["serveConfigV2"])
    (application,) = [a for a in data["applications"] if a["import_path"] == "serve_app.app:build_app"]
    return application["args"]


@pytest.mark.parametrize("path", [CONFIG_YAML, MANIFEST], ids=["config.yaml", "rayservice.yaml"])
def test_shipped_app_args_state_the_defaults_or_a_deliberate_override(path):
    args = app_args_of(path)
    assert unknown_keys(args, ServeConfig) == []  # no key the app would not read (none silently dropped)
    ServeConfig.model_validate(args)
    defaults = stated_values(ServeConfig().model_dump(mode="json"))
    stated = stated_values(args)
    differ = {key for key, value in stated.items() if defaults.get(key, "<no default>") != value}
    assert differ == OVERRIDES[path]


TYPOS = {
    "http_options.request_timeout": lambda c: c["http_options"].update(request_timeout=5),
    "applications[0].import_pth": lambda c: c["applications"][0].update(import_pth="x.y"),
    "applications[0].runtime_env.env_var": lambda c: c["applications"][0]["runtime_env"].update(env_var={"A": "1"}),
    "applications[0].deployments[0].autoscaling_config.max_replica": lambda c: c["applications"][0].update(
        deployments=[{"name": "SamplerDeployment", "autoscaling_config": {"min_replicas": 1, "max_replica": 4}}]
    ),
    "applications[0].deployments[0].max_concurrent_queries": lambda c: c["applications"][0].update(
        deployments=[{"name": "ScorerDeployment", "max_concurrent_queries": 16}]
    ),
}


@pytest.mark.parametrize("path", TYPOS)
def test_typos_that_serve_would_drop_are_caught(serve_config, path):
    bad = copy.deepcopy(serve_config)
    TYPOS[path](bad)
    if "import_pth" not in path:
        ServeDeploySchema.model_validate(bad)  # Serve itself accepts the typo silently ...
    assert path in unknown_keys(bad, ServeDeploySchema)  # ... the strict walk does not


def test_typo_in_app_args_is_caught(serve_config):
    bad = copy.deepcopy(serve_config)
    bad["applications"][0]["args"]["scoring"]["layers"] = [6, 12]
    with pytest.raises(Exception, match="layers"):
        check_serve_config(bad)
    old = copy.deepcopy(serve_config)
    old["applications"][0]["args"]["sampling"]["candidates"] = 4  # a key's former name: the new one is named
    with pytest.raises(Exception, match="candidates: renamed n "):
        check_serve_config(old)


# ---------------------------------------------------------------------------------------- RayService


def test_manifest_is_a_rayservice_running_serve_app(manifest, serve_config):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    spec = manifest["spec"]
    assert set(spec) <= RAYSERVICE_SPEC_KEYS
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    served = yaml.safe_load(spec["serveConfigV2"])
    schema = check_serve_config(served)
    local = serve_config["applications"][0]
    (application,) = schema.applications
    assert (application.name, application.import_path, application.route_prefix) == (
        local["name"], local["import_path"], local["route_prefix"])
    args = ServeConfig.model_validate(application.args)
    # the proxy binds all pod interfaces, so the app must refuse to run without its bearer token
    assert schema.http_options.host == "0.0.0.0"
    assert args.auth.required and args.auth.token_env
    assert Path(args.model.adapter).is_absolute()  # replicas run in other working directories


def test_manifest_cluster(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC_KEYS
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"  # replicas run on workers
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    token_env = served["applications"][0]["args"]["auth"]["token_env"]
    port = served["http_options"]["port"]
    pods = [("head", head["template"])] + [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    images = set()
    for name, template in pods:
        (container,) = template["spec"]["containers"]
        images.add(container["image"])
        assert any(p["containerPort"] == port for p in container.get("ports", [])), name
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env[token_env]["valueFrom"], name  # the token comes from a Secret, not the manifest
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["cpu"] == requests["cpu"], name
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # one image everywhere, and the Dockerfile builds it on the same Ray version
    assert len(images) == 1 and not next(iter(images)).endswith(":latest")
    base_image = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base_image.startswith(f"rayproject/ray:{ray.__version__}-")


def test_manifest_replicas_fit_the_worker_pods(manifest):
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args = ServeConfig.model_validate(served["applications"][0]["args"])
    cluster = manifest["spec"]["rayClusterConfig"]
    worker_cpus = [float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in cluster["workerGroupSpecs"]]
    for role in ("sampler", "scorer", "ingress"):
        assert getattr(args.deployments, role).ray_actor_options.num_cpus <= max(worker_cpus), role
