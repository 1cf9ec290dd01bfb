"""Load benchmark of the Serve app: latency, throughput, errors, and the Best-of-N overhead.

Run from the repository root (defaults take ~4 minutes on 2 CPU cores, `--concurrency 1,4` ~10)::

    HF_HUB_OFFLINE=1 python benchmarks/load_serve.py                      # starts the app in-process
    HF_HUB_OFFLINE=1 python benchmarks/load_serve.py --concurrency 1,4 --requests 20 --n 4 --max-tokens 48
    dabon serve --adapter DIR --set serving.allow_skip_scoring=true &     # or against a running server
    python benchmarks/load_serve.py --url http://127.0.0.1:8000 [--token-env DABON_API_KEY]

What it does:

1. without ``--url``: starts a local Ray and the app (``serve_app.app.build_app``) on a free port of
   127.0.0.1 with SmolLM2-135M-Instruct and a random LoRA adapter (``--adapter DIR`` for a real
   one), one sampler and one scorer replica, and ``serving.allow_skip_scoring`` on;
2. for each concurrency in ``--concurrency``: ``--requests`` chat completions with ``n=--n`` and
   ``max_tokens=--max-tokens`` from that many client threads (bounded: at most ``concurrency`` in
   flight), in two modes, run as halves in the order full, sampling-only, sampling-only, full (so
   a drift in the shared machine's load affects both alike):
   - **full**: the normal request (sample N, score them, return the argmin);
   - **sampling-only**: the same request with ``"dabon": {"skip_scoring": true}``: the same
     ingress, tokenization and sampler call, then candidate 0 without scoring;
   request ``i`` carries ``seed=i`` and the same prompt in both modes, so both modes sample the
   very same N candidates (same prompt ids, seed and batch of one) and differ only by scoring;
3. prints per mode p50 / p95 / mean latency, throughput (requests/s) and errors, then the
   Best-of-N overhead: p50 and mean latency of full over sampling-only (target: <= 1.15 at N=4).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BASE = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "How do I pick a ripe avocado?",
    "Write a haiku about autumn rain.",
    "What are the health benefits of walking every day?",
    "How can I safely store leftover rice?",
    "Summarise the plot of Romeo and Juliet briefly.",
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def start_app(args: argparse.Namespace) -> tuple[str, Any]:
    """Start local Ray + the app on a free loopback port; return (base url, shutdown function)."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    adapter = args.adapter
    if adapter is None:
        from actors.models import write_random_adapter

        adapter = str(Path(tempfile.gettempdir()) / "dabon-bench-adapter")
        if not (Path(adapter) / "adapter_config.json").is_file():
            write_random_adapter(BASE, adapter, seed=0)
    config = {
        "model": {"base": BASE, "adapter": adapter},
        "sampling": {"default_n": args.n, "max_n": max(args.n, 8), "default_max_tokens": args.max_tokens,
                     "max_tokens": max(args.max_tokens, 64)},
        "scoring": {"layer": args.layer},
        "serving": {"allow_skip_scoring": True, "max_in_flight": 256, "request_timeout_s": 600},
        "deployments": {
            "ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.25}},
            "sampler": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1},
                        "ray_actor_options": {"num_cpus": 1}},
            "scorer": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                       "ray_actor_options": {"num_cpus": 1}},
        },
    }
    ray.init(
        num_cpus=3, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                  "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 900})
    serve.run(build_app(config), name="dabon", route_prefix="/")

    def shutdown() -> None:
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}", shutdown


def one_request(session: Any, url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int, int]:
    """POST one chat completion; return (seconds, HTTP status, completion tokens)."""
    start = time.perf_counter()
    try:
        response = session.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=900)
    except Exception:  # noqa: BLE001 - counted as an error
        return time.perf_counter() - start, 0, 0
    elapsed = time.perf_counter() - start
    tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.status_code == 200 else 0
    return elapsed, response.status_code, tokens


def run_phase(url: str, headers: dict[str, str], indices: list[int], concurrency: int, n: int,
              max_tokens: int, skip_scoring: bool) -> dict[str, Any]:
    """Send the requests ``indices`` with at most ``concurrency`` in flight; return timings."""
    import threading

    import requests

    local = threading.local()

    def call(index: int) -> tuple[float, int, int]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = {
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "n": n, "max_tokens": max_tokens, "seed": index,
            "dabon": {"skip_scoring": skip_scoring},
        }
        return one_request(session, url, headers, body)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(call, indices))
    return {"wall_s": time.perf_counter() - start, "results": results}


def summarise(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/mean latency of successful requests, throughput and error count over phases."""
    latencies = [s for phase in phases for s, status, _ in phase["results"] if status == 200]
    errors = sum(1 for phase in phases for _, status, _ in phase["results"] if status != 200)
    total = sum(len(phase["results"]) for phase in phases)
    wall = sum(phase["wall_s"] for phase in phases)
    tokens = sum(t for phase in phases for _, status, t in phase["results"] if status == 200)
    return {
        "requests": total, "errors": errors,
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "throughput_rps": (total - errors) / wall if wall else float("nan"),
        "generated_tokens_per_s": tokens / wall if wall else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table (and ``--json`` to a file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (needs serving.allow_skip_scoring=true)")
    parser.add_argument("--token-env", default="DABON_API_KEY", help="environment variable with the bearer token, if any")
    parser.add_argument("--adapter", default=None, help="LoRA adapter for the in-process app (default: a random one)")
    parser.add_argument("--layer", type=int, default=12, help="serving layer of the in-process app (default 12)")
    parser.add_argument("--n", type=int, default=4, help="candidates per request (default 4)")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per candidate (default 48)")
    parser.add_argument("--requests", type=int, default=20, help="requests per mode and concurrency (default 20)")
    parser.add_argument("--concurrency", default="4", help="comma-separated client counts (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    if args.requests < 2 or not levels or min(levels) < 1:
        parser.error("--requests must be >= 2 and --concurrency a list of positive integers")

    shutdown = None
    url = args.url
    if url is None:
        started = time.perf_counter()
        url, shutdown = start_app(args)
        print(f"app started in {time.perf_counter() - started:.1f} s at {url}")
    headers = {"Content-Type": "application/json"}
    token = os.environ.get(args.token_env or "", "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    report: dict[str, Any] = {"n": args.n, "max_tokens": args.max_tokens, "requests": args.requests, "levels": {}}
    try:
        run_phase(url, headers, list(range(args.warmup)), 1, args.n, args.max_tokens, False)
        run_phase(url, headers, list(range(args.warmup)), 1, args.n, args.max_tokens, True)
        for concurrency in levels:
            first = list(range(args.requests // 2))
            second = list(range(args.requests // 2, args.requests))
            full = [run_phase(url, headers, first, concurrency, args.n, args.max_tokens, False)]
            sampling = [run_phase(url, headers, first, concurrency, args.n, args.max_tokens, True)]
            sampling.append(run_phase(url, headers, second, concurrency, args.n, args.max_tokens, True))
            full.append(run_phase(url, headers, second, concurrency, args.n, args.max_tokens, False))
            report["levels"][concurrency] = {"full": summarise(full), "sampling_only": summarise(sampling)}
    finally:
        if shutdown is not None:
            shutdown()

    print(f"\nBest-of-N load benchmark: N={args.n}, max_tokens={args.max_tokens}, {args.requests} requests per mode, {url}")
    print(f"{'clients':>7} {'mode':<14} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'req/s':>7} {'tok/s':>7} {'errors':>6}")
    for concurrency, modes in report["levels"].items():
        for mode, stats in modes.items():
            print(f"{concurrency:>7} {mode:<14} {stats['p50_s']:>7.2f} {stats['p95_s']:>7.2f} {stats['mean_s']:>7.2f} "
                  f"{stats['throughput_rps']:>7.3f} {stats['generated_tokens_per_s']:>7.1f} {stats['errors']:>6}")
        full, sampling = modes["full"], modes["sampling_only"]
        modes["overhead_p50"] = full["p50_s"] / sampling["p50_s"]
        modes["overhead_mean"] = full["mean_s"] / sampling["mean_s"]
        print(f"{concurrency:>7} Best-of-N overhead (full / sampling-only): p50 x{modes['overhead_p50']:.3f}, "
              f"mean x{modes['overhead_mean']:.3f}  (target <= 1.15)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    errors = sum(stats["errors"] for modes in report["levels"].values() for key, stats in modes.items() if isinstance(stats, dict))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
