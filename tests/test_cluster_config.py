"""cluster.yaml: schema-valid for the installed Ray, and shaped the way dabon relies on.

No cluster is started and nothing talks to a cloud: the schema check is plain jsonschema, and
Ray's own ``prepare_config`` for ``provider.type: aws`` only merges ``ray/autoscaler/aws/defaults.yaml``
(no boto3 session, no EC2 calls; the AWS bootstrap that does call EC2 is a separate step,
``_bootstrap_config``, which is not used here). ``test_ray_validation`` blocks sockets to keep it so.
"""

import copy
import json
import os
import socket
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import jsonschema  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

import ray.autoscaler  # noqa: E402
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture
def config():
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ray_validate(cfg):
    """Ray's own offline validation, as `ray up` does it before any cloud call.

    validate_config expects a *prepared* config (it insists on fields such as
    cluster_synced_files that prepare_config fills in from the provider defaults).
    """
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _start_cmds(cfg, key):
    return [c for c in cfg[key] if "ray start" in c]


# --- validity ---------------------------------------------------------------------------------


def test_schema_valid(config, schema):
    jsonschema.validate(config, schema)


def test_ray_validation(config, no_network):
    prepared = ray_validate(config)
    # prepare_config fills defaults but must not change what we set.
    assert prepared["head_node_type"] == "head_cpu"
    assert prepared["available_node_types"]["head_cpu"]["max_workers"] == 0
    assert prepared["max_workers"] == config["max_workers"]


# --- structure dabon relies on ----------------------------------------------------------------


def test_head_node_type(config):
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert head == "head_cpu"
    assert types[head]["max_workers"] == 0
    assert types[head].get("min_workers", 0) == 0
    assert types[head]["resources"].get("GPU", 0) == 0


def test_gpu_worker_type(config):
    types = config["available_node_types"]
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no node type offers a GPU resource"
    assert config["head_node_type"] not in gpu_types
    gpu = types["gpu_worker"]
    assert gpu["resources"] == {"CPU": 8, "GPU": 1}
    assert gpu["max_workers"] >= 1
    # A node type's worker_setup_commands replace the global lists, so it must install dabon itself.
    assert any('pip install -e ".[vllm]"' in c for c in gpu["worker_setup_commands"])


def test_cpu_worker_type(config):
    cpu = config["available_node_types"]["cpu_worker"]
    assert cpu["resources"].get("GPU", 0) == 0
    assert cpu["resources"]["CPU"] >= 1
    assert (cpu.get("min_workers", 0), cpu["max_workers"]) == (0, 4)


def test_min_workers_le_max_workers(config):
    for name, t in config["available_node_types"].items():
        assert t.get("min_workers", 0) <= t["max_workers"], name


def test_worker_max_sum_within_global_max(config):
    head = config["head_node_type"]
    total = sum(
        t["max_workers"] for name, t in config["available_node_types"].items() if name != head
    )
    assert total <= config["max_workers"]


def test_head_start_command(config):
    cmds = config["head_start_ray_commands"]
    assert cmds[0].strip() == "ray stop"
    (start,) = _start_cmds(config, "head_start_ray_commands")
    assert "--head" in start
    assert "--port=6379" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    # The dashboard/job API must stay on loopback (reach it through `ray dashboard`).
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


def test_worker_start_command(config):
    cmds = config["worker_start_ray_commands"]
    assert cmds[0].strip() == "ray stop"
    (start,) = _start_cmds(config, "worker_start_ray_commands")
    assert "--address=$RAY_HEAD_IP:6379" in start


def test_auth_mode_consistent(config):
    starts = _start_cmds(config, "head_start_ray_commands") + _start_cmds(
        config, "worker_start_ray_commands"
    )
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.dabon-ray-auth/auth_token" in cmd, cmd
    # the token directory is synced to every node
    assert "~/.dabon-ray-auth" in config["file_mounts"]


def test_repo_synced_and_installed(config):
    assert config["file_mounts"]["~/dabon"] == "."
    assert ".git" in config["rsync_exclude"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("cd ~/dabon && pip install -e ." in c for c in config[key]), key
    # CPU nodes take the CPU torch wheel, not the multi-GB CUDA one.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("download.pytorch.org/whl/cpu" in c for c in config[key]), key


# --- the validation can fail ------------------------------------------------------------------


def _rename(d, old, new):
    d[new] = d.pop(old)


TYPOS = {
    "top-level max_worker": lambda c: _rename(c, "max_workers", "max_worker"),
    "node-type min_worker": lambda c: _rename(
        c["available_node_types"]["cpu_worker"], "min_workers", "min_worker"
    ),
    "node-type setup_commands": lambda c: c["available_node_types"]["gpu_worker"].update(
        setup_commands=["true"]
    ),
}


@pytest.mark.parametrize("mutate", TYPOS.values(), ids=TYPOS.keys())
def test_misspelled_key_rejected(config, schema, mutate, no_network):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        ray_validate(bad)


def test_unknown_head_node_type_rejected(config, no_network):
    bad = copy.deepcopy(config)
    bad["head_node_type"] = "head"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(bad)
