"""Run by tests/test_multinode.py in its own process (a Ray cluster of its own, apart from the
suite's local Ray): a two-node local cluster (``ray.cluster_utils.Cluster``), a head with a
label ``dabon-node=head`` and a worker node labelled ``dabon-node=worker``, storage on an S3
server at 127.0.0.1. It runs an evaluation and a distillation whose actor pools and trainer
workers ask for the worker node, with every file on S3, and prints one JSON line of facts for
the test to check: where each actor ran, which files the runs wrote, and the refusals.

    python -m tests.multinode_run S3_ENDPOINT BASE_MODEL ADAPTER WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(endpoint: str, base: str, adapter: str, workdir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from actors import storage
    from actors.config import ConfigError, build_config
    from pipelines.distill import DistillConfig, run_distill
    from pipelines.evaluate import EvalConfig, run_evaluation

    facts: dict = {}
    bucket = f"s3://dabon-test?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true"
    root = storage.join(bucket, "runs")
    storage.filesystem(bucket)[0].create_dir("dabon-test")
    storage.upload_dir(adapter, storage.join(root, "student-adapter"))

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "labels": {"dabon-node": "head"}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
    })
    worker = cluster.add_node(num_cpus=4, labels={"dabon-node": "worker"})
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HF_", "DABON_", "RAY_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        facts["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        facts["worker_node"] = worker.node_id
        on_worker = {"label_selector": {"dabon-node": "worker"}}
        evaluation = {
            "model": {"base": base, "adapter": storage.join(root, "student-adapter")},
            "benchmarks": [{"name": "star1", "path": str(REPO / "tests" / "fixtures" / "data" / "star1.json"),
                            "star1_split": "all"}],
            "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 4, "seed": 0},
            "scoring": {"layers": [2, 4], "metrics": ["latent_sim", "kl"]},
            "resources": {"sampler": {"num_cpus": 1, "batch_size": 3, "torch_threads": 1, **on_worker},
                          "judge": {"num_cpus": 0.5, **on_worker},
                          "scorer": {"num_cpus": 1, "batch_size": 3, "torch_threads": 1, **on_worker}},
            "output": {"dir": storage.join(root, "eval"), "shard_size": 3},
            "report": {"bootstrap": 0},
        }
        # a path on this machine is refused on a two-node cluster, before anything is written
        local = Path(workdir) / "local-eval"
        try:
            run_evaluation(build_config(EvalConfig, {**evaluation, "output": {"dir": str(local)}}), progress=False)
        except ConfigError as err:
            facts["local_refused"] = str(err)
        facts["local_written"] = local.exists()
        # ... unless every node mounts it (here they share one disk) and it is listed as shared
        shared = build_config(EvalConfig, {**evaluation, "output": {"dir": str(Path(workdir) / "shared" / "eval")},
                                           "ray": {"shared_mounts": [str(Path(workdir) / "shared")]},
                                           "benchmarks": [{**evaluation["benchmarks"][0], "limit": 1}]})
        facts["shared_ok"] = bool(run_evaluation(shared, progress=False)["benchmarks"])

        metrics = run_evaluation(build_config(EvalConfig, evaluation), progress=False)
        facts["eval_prompts"] = metrics["benchmarks"]["star1"]["n_prompts"]
        facts["eval_files"] = [loc.split("?")[0] for loc in storage.list_files(storage.join(root, "eval"), recursive=True)]

        distill = build_config(DistillConfig, {
            "name": "multinode",
            "model": {"base": base},
            "data": {"name": "star1", "path": str(REPO / "tests" / "fixtures" / "data" / "star1.json"), "star1_split": "train"},
            "teacher": {"backend": "replay", "resources": {"batch_size": 2}},
            "filter": {"judge": {"name": "keyword"}, "resources": {"batch_size": 2, **on_worker}},
            "sft": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "learning_rate": 1e-2, "num_epochs": 1,
                    "per_device_batch_size": 1, "effective_batch_size": 1, "max_length": 256,
                    "gradient_checkpointing": False, "logging_steps": 1,
                    "scaling": {"cpus_per_worker": 1, "torch_threads": 1, "label_selector": {"dabon-node": "worker"}}},
            "output": {"dir": storage.join(root, "distill"), "shard_size": 2},
        })
        summaries = run_distill(distill, progress=False)
        facts["sft_steps"] = summaries["sft"]["global_step"]
        facts["distill_files"] = [loc.split("?")[0] for loc in storage.list_files(storage.join(root, "distill"), recursive=True)]

        names = ("SamplerWorker", "JudgeWorker", "ScorerWorker", "RayTrainWorker")
        placed: dict[str, list[str]] = {}
        for actor in list_actors(address=cluster.address, detail=True, limit=10_000, raise_on_missing_output=False):
            if any(name in actor.class_name for name in names):
                placed.setdefault(next(name for name in names if name in actor.class_name), []).append(actor.node_id)
        facts["placed"] = placed
    finally:
        ray.shutdown()
        cluster.shutdown()
    return facts


if __name__ == "__main__":
    print("FACTS " + json.dumps(main(*sys.argv[1:5])))
