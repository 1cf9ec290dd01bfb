"""The Ray runtime every driver shares: start or join Ray, actor pools, resource checks, and
streaming rows into shards that are written once complete (so a rerun resumes).

- ``init_ray(RayConfig)``: join a cluster (``address``) or start a local Ray in-process with
  the dashboard on 127.0.0.1 (Ray Train's placement-group cleaner polls the State API, which
  the dashboard serves; without it the terminal fills with "Failed to query Ray Train
  Controller actor state"). Workers get the repository on ``PYTHONPATH`` and the
  offline/cache environment; Ray's and the ML libraries' chatter is kept off the terminal
  unless ``verbose``.
- ``pool_options(PoolConfig)``: ``Dataset.map_batches`` keyword arguments of an actor pool.
- ``check_pools`` / ``require_resources``: refuse, before any work, pools the cluster can never
  place (a GPU ask on a cluster without GPUs waits forever in Ray Data and Ray Train).
- ``assign_shards`` / ``stream_shards``: group records into fixed, ordered shards and stream
  them through a Ray Data plan, handing each shard to a writer as soon as all its rows are in.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from actors.config import ConfigError, PoolConfig, RayConfig
from actors.rows import to_plain
from actors.settings import forwarded_environment, get_logger

logger = get_logger(__name__)

Row = dict[str, Any]

# Ray Data fails a pool that cannot start this many seconds (instead of waiting forever).
WAIT_FOR_MIN_ACTORS_S = 600
# Warnings the ML libraries print on every run (deprecations of their own internals).
QUIET_WARNINGS = (FutureWarning, DeprecationWarning, UserWarning)
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers", "datasets", "vllm", "peft", "trl")


def quiet_libraries(verbose: bool = False) -> dict[str, str]:
    """Keep Ray's and the ML libraries' chatter off the terminal (unless ``verbose``) in this
    process; returns the environment variables that do the same in Ray workers."""
    if verbose:
        return {}
    for category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # Ray Data configures its own logger on import: keep its file log, quiet its console
        import ray.data  # noqa: F401

        data_logger = logging.getLogger("ray.data")
        data_logger.setLevel(logging.DEBUG)
        for handler in data_logger.handlers:
            if type(handler).__name__ == "PlainRayHandler":
                handler.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return {
        "PYTHONWARNINGS": "ignore",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "DATASETS_VERBOSITY": "error",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map bars inside the trainer
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # weight-loading bars (the Trainer's own bar stays)
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # workers' own Ray Data bars (the driver's stay)
        "VLLM_LOGGING_LEVEL": "WARNING",
        "RAY_DEDUP_LOGS": "1",
    }


def worker_environment(verbose: bool = False) -> dict[str, str]:
    """Environment variables every Ray worker of a dabon job gets (see ``init_ray``)."""
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **forwarded_environment()}
    repo = str(Path(__file__).resolve().parents[1])
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env_vars.update(quiet_libraries(verbose))
    return env_vars


def init_ray(config: RayConfig, *, log_to_driver: bool = True, verbose: bool = False,
             env_vars: dict[str, str] | None = None) -> bool:
    """Join ``config.address`` or start a local Ray in-process (see module doc); True when this
    call started (or joined) Ray, so the caller shuts it down; False when Ray was already up.

    ``log_to_driver``: forward worker output (training progress, worker errors).
    ``env_vars``: extra environment variables for the workers.
    """
    import ray

    if ray.is_initialized():
        return False
    environment = {**worker_environment(verbose), **(env_vars or {})}
    level = logging.INFO if verbose else logging.WARNING
    # the Python loggers of every worker (Ray Train's controller and workers log each step at INFO)
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level=logging.getLevelName(level))
    if config.address:
        ray.init(address=config.address, runtime_env={"env_vars": environment}, log_to_driver=log_to_driver,
                 logging_level=level, logging_config=logging_config)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, in-process cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=config.num_cpus or max(4, (os.cpu_count() or 2) + 2),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=config.object_store_mb * 1024 * 1024,
        log_to_driver=log_to_driver,
        logging_level=level,
        logging_config=logging_config,
        runtime_env={"env_vars": environment},
    )
    return True


# ----------------------------------------------------------------------------------------
# Pools and resources
# ----------------------------------------------------------------------------------------


def pool_strategy(pool: PoolConfig) -> Any:
    """``ray.data.ActorPoolStrategy`` of a pool: fixed, or elastic between min and max actors."""
    import ray

    if pool.min_actors == pool.max_actors:
        return ray.data.ActorPoolStrategy(size=pool.min_actors)
    return ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)


def pool_options(pool: PoolConfig) -> dict[str, Any]:
    """``Dataset.map_batches`` keyword arguments for a callable class run by ``pool``."""
    options = {"compute": pool_strategy(pool), "batch_size": pool.batch_size, "num_cpus": pool.num_cpus,
               "num_gpus": pool.num_gpus}
    if pool.label_selector:
        options["label_selector"] = dict(pool.label_selector)
    return options


def require_resources(key: str, cluster: dict[str, float], cpus: float = 0.0, gpus: float = 0.0) -> None:
    """Refuse an ask (``cpus``/``gpus`` for one unit of work named by config ``key``) that this
    cluster can never place; the error names the key."""
    have_gpus = cluster.get("GPU", 0)
    if gpus > 0 and have_gpus < gpus:
        raise ConfigError(
            f"{key}: asks for {gpus:g} GPU(s), but this Ray cluster has {have_gpus:g}; "
            "set it to 0 to run on CPUs or connect to a GPU cluster (--ray-address)"
        )
    have_cpus = cluster.get("CPU", 0)
    if cpus > have_cpus:
        raise ConfigError(f"{key}: asks for {cpus:g} CPUs, but this Ray cluster has {have_cpus:g}")


def check_pools(pools: Iterable[tuple[str, PoolConfig]], cluster: dict[str, float] | None = None) -> None:
    """``require_resources`` for one actor of each ``(config key, pool)``."""
    import ray

    cluster = ray.cluster_resources() if cluster is None else cluster
    for key, pool in pools:
        require_resources(f"{key}.num_gpus" if pool.num_gpus else f"{key}.num_cpus", cluster, pool.num_cpus, pool.num_gpus)


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (``ray.nodes()`` entries)."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def check_shared_location(key: str, location: str | None, config: RayConfig) -> None:
    """On a cluster of more than one node, refuse a run location that other nodes cannot see:
    a local path must lie under one of ``ray.shared_mounts``, and that mount must show a marker
    file written here on every node; storage URIs (``s3://``, ``gs://``) always pass."""
    from actors import storage

    if not location or not storage.is_local(location) or len(alive_nodes()) <= 1:
        return
    path = os.path.abspath(storage.filesystem(location)[1])
    mounts = [os.path.abspath(os.path.expanduser(mount)) for mount in config.shared_mounts]
    if not any(path == mount or path.startswith(mount.rstrip(os.sep) + os.sep) for mount in mounts):
        raise ConfigError(
            f"{key}: {location!r} is a path on this machine, and the Ray cluster has {len(alive_nodes())} nodes, "
            "whose workers cannot read or write it; use a storage URI every node reaches (s3://bucket/..., gs://...) "
            "or a directory every node mounts, listed in ray.shared_mounts"
        )
    verify_visible_everywhere(key, location)


def verify_visible_everywhere(key: str, location: str) -> None:
    """Write a marker under ``location`` and check from a task on every alive node that it is there."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors import storage

    marker = storage.join(location, f".dabon-visible-{uuid.uuid4().hex}")
    storage.write_text(marker, "dabon storage check\n")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        local_marker = storage.filesystem(marker)[1]
        nodes = alive_nodes()
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(local_marker)
                  for node in nodes]
        blind = [node["NodeManagerAddress"] for node, seen in zip(nodes, ray.get(checks, timeout=120)) if not seen]
    finally:
        storage.remove(marker)
    if blind:
        raise ConfigError(f"{key}: {location!r} is listed in ray.shared_mounts but nodes {', '.join(blind)} do not see it")


def blocks_for(rows: int, batch_size: int) -> int:
    """Input blocks for ``rows`` rows fed ``batch_size`` at a time: one per batch, so every actor of
    a pool gets work (few blocks would keep one actor busy and the others idle)."""
    return max(1, math.ceil(rows / batch_size))


# ----------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------


def shard_name(group: str, index: int) -> str:
    """File name of a shard: ``<group>-<index:05d>.parquet``."""
    return f"{group}-{index:05d}.parquet"


def assign_shards(records: list[Row], shard_size: int, group_key: str = "benchmark",
                  id_key: str = "prompt_id") -> dict[str, list[Row]]:
    """Group records into shards of ``shard_size`` in their group's order (each record gains a
    ``shard`` key); an id repeated within a group is an error."""
    shards: dict[str, list[Row]] = {}
    position: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for record in records:
        key = (str(record[group_key]), str(record[id_key]))
        if key in seen:
            raise ConfigError(f"{group_key} {key[0]!r}: {id_key} {key[1]!r} appears twice")
        seen.add(key)
        index = position.get(key[0], 0)
        position[key[0]] = index + 1
        name = shard_name(key[0], index // shard_size)
        shards.setdefault(name, []).append({**record, "shard": name})
    return shards


def stream_shards(
    shards: dict[str, list[Row]],
    build_dataset: Callable[[list[Row]], Any],
    write_shard: Callable[[str, list[Row]], None],
    progress: bool = True,
    description: str = "shards",
) -> None:
    """Stream the rows of ``shards`` (each row holds its ``shard`` name) through
    ``build_dataset(rows)`` and call ``write_shard(name, rows)`` as soon as a shard is complete.

    A shard whose rows do not all come back is an error naming it (never a partial write).
    """
    from ray.data import DataContext
    from tqdm import tqdm

    if not shards:
        return
    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.wait_for_min_actors_s = WAIT_FOR_MIN_ACTORS_S
    expected = {name: len(rows) for name, rows in shards.items()}
    collected: dict[str, list[Row]] = {name: [] for name in shards}
    dataset = build_dataset([row for rows in shards.values() for row in rows])
    with tqdm(total=len(shards), unit="shard", desc=description, disable=not progress) as bar:
        for row in dataset.iter_rows():
            row = to_plain(dict(row))
            name = row["shard"]
            if name not in collected:
                raise RuntimeError(f"the pipeline returned a row of shard {name!r} twice or unasked")
            collected[name].append(row)
            if len(collected[name]) == expected[name]:
                write_shard(name, collected.pop(name))
                bar.update(1)
    if collected:
        missing = {name: expected[name] - len(rows) for name, rows in collected.items()}
        raise RuntimeError(f"the pipeline ended with incomplete shards (rows missing): {missing}")
