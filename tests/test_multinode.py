"""The cluster path: on a two-node local Ray cluster (``ray.cluster_utils.Cluster``) with storage on
an S3 server at 127.0.0.1 (moto), an evaluation and a distillation place their actor pools and
trainer workers on the labelled second node, and read and write their files only through the
configured storage; a path on the head alone is refused. The cluster lives in its own process
(tests/multinode_run.py), apart from the suite's local Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1, stopped at the end of the module."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, "the S3 server did not start"
            time.sleep(0.2)
    yield f"127.0.0.1:{port}", env
    server.terminate()
    server.wait(timeout=30)


def test_runs_on_the_second_node_through_s3_storage(s3_server, tiny_models, tmp_path):
    endpoint, env = s3_server
    env = {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "DABON_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "tests.multinode_run", endpoint, tiny_models.base, tiny_models.adapter, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("FACTS ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-5000:]
    facts = json.loads(lines[-1][len("FACTS "):])

    assert facts["nodes"] == 2
    assert "output.dir" in facts["local_refused"] and "s3://" in facts["local_refused"]
    assert "ray.shared_mounts" in facts["local_refused"] and not facts["local_written"]
    assert facts["shared_ok"]
    # every actor of the pools and every trainer worker ran on the worker node
    assert set(facts["placed"]) == {"SamplerWorker", "JudgeWorker", "ScorerWorker", "RayTrainWorker"}
    assert {node for nodes in facts["placed"].values() for node in nodes} == {facts["worker_node"]}
    # all six prompts, in shards, config, metrics and report on S3
    assert facts["eval_prompts"] == 6
    prefix = "s3://dabon-test/runs/eval/"
    assert {f"{prefix}config.yaml", f"{prefix}metrics.json", f"{prefix}report.md",
            f"{prefix}samples/star1-00000.parquet", f"{prefix}samples/star1-00001.parquet"} <= set(facts["eval_files"])
    # the distillation's traces, Ray Train checkpoints and the exported adapter with its prompt on S3
    prefix = "s3://dabon-test/runs/distill/"
    files = set(facts["distill_files"])
    assert {f"{prefix}adapter/adapter_model.safetensors", f"{prefix}adapter/prompt.yaml",
            f"{prefix}filtered/kept.parquet", f"{prefix}traces/star1-00000.parquet"} <= files
    assert any(name.startswith(f"{prefix}sft/checkpoint_") for name in files)
    assert facts["sft_steps"] >= 1
    # nothing of the runs landed on the local disk (only the cache of downloaded adapters)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "shared"]
