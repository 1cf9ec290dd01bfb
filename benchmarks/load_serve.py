"""Load benchmark of the Serve app on the vLLM and the HF engine: latency, throughput, errors,
and the Best-of-N overhead.

Run from the repository root (the defaults take ~15 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/load_serve.py                     # both engines, in-process apps
    HF_HUB_OFFLINE=1 python benchmarks/load_serve.py --backends vllm --concurrency 1 --requests 10
    dabon serve --adapter DIR --set serving.allow_skip_scoring=true &    # or against a running server
    python benchmarks/load_serve.py --url http://127.0.0.1:8000 [--token-env DABON_API_KEY]

What it does:

1. without ``--url``, per engine of ``--backends`` (``vllm``, ``hf``): starts a local Ray and the
   app (``serve_app.app.build_app``) on a free port of 127.0.0.1 with SmolLM2-135M-Instruct and
   a random LoRA adapter (``--adapter DIR`` for a real one), one sampler and one scorer replica,
   the admission limit derived from the sampler's capacity (the default), the scorer on
   ``--scorer-threads`` torch threads (2, as ``serve_app/config.yaml``), and
   ``serving.allow_skip_scoring`` on;
2. for each concurrency in ``--concurrency``: ``--requests`` chat completions with
   ``dabon.candidates=--n`` and ``max_tokens=--max-new-tokens`` from that many client
   threads, in two modes, run as halves in the order full, sampling-only, sampling-only, full
   (so a drift in the shared machine's load affects both alike):
   - **full**: the normal request (sample N, score them, return the best);
   - **sampling-only**: the same request with ``"dabon": {"skip_scoring": true}``: the same
     ingress, tokenization and sampler call, then the candidates unscored;
   request ``i`` carries ``seed=i`` and the same prompt in both modes, so both modes sample the
   very same N candidates and differ only by scoring. Clients behave: a 503 is retried after
   its ``Retry-After``; the latency of a request runs from its first attempt to its answer;
3. prints per engine, concurrency and mode p50 / p95 / mean latency, throughput (requests/s),
   generated tokens/s, 503s retried and errors (answers other than 200 after retries), then the
   Best-of-N overhead: p50 and mean latency of full over sampling-only (target: <= 1.25 at one
   client on the vLLM engine), and where the time goes: the mean seconds each answered request
   waited on the sampling and the scoring stage, as the server reports them
   (``dabon.timings``, queueing included). Sampling in full mode against sampling-only shows
   how much the scorer slows the engine where both share the same cores.
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


def start_app(args: argparse.Namespace, backend: str) -> tuple[str, Any]:
    """Start local Ray + the app with the ``backend`` engine on a free loopback port; return
    (base url, shutdown function)."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    adapter = args.adapter
    if adapter is None:
        from actors.models import write_random_adapter

        adapter = str(Path(tempfile.gettempdir()) / "dabon-bench-adapter")
        if not (Path(adapter) / "adapter_config.json").is_file():
            write_random_adapter(BASE, adapter, seed=0)
    generator: dict[str, Any] = {"backend": backend}
    if backend == "vllm":  # the config.yaml engine settings
        generator["options"] = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "cpu_kv_cache_gib": 1}
    config = {
        "model": {"base": BASE, "adapter": adapter},
        "generator": generator,
        "sampling": {"n": args.n, "max_n": max(args.n, 8),
                     "max_new_tokens": args.max_new_tokens, "max_new_tokens_limit": max(args.max_new_tokens, 64)},
        "scoring": {"layer": args.layer},
        "serving": {"allow_skip_scoring": True, "request_timeout_s": 600},
        "deployments": {
            "ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.25}},
            "sampler": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1},
                        "ray_actor_options": {"num_cpus": 1}},
            "scorer": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                       "ray_actor_options": {"num_cpus": 1}, "torch_threads": args.scorer_threads},
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


def one_request(session: Any, url: str, headers: dict[str, str],
                body: dict[str, Any]) -> tuple[float, int, int, int, dict[str, float]]:
    """POST one chat completion, retrying 503s after ``Retry-After``; return (seconds from the first
    attempt, final HTTP status, completion tokens, 503s retried, the server's stage timings)."""
    start = time.perf_counter()
    retried = 0
    while True:
        try:
            response = session.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=900)
        except Exception:  # noqa: BLE001 - counted as an error
            return time.perf_counter() - start, 0, 0, retried, {}
        if response.status_code != 503 or time.perf_counter() - start > 600:
            break
        retried += 1
        time.sleep(float(response.headers.get("Retry-After", "1")))
    elapsed = time.perf_counter() - start
    answer = response.json() if response.status_code == 200 else {}
    tokens = answer.get("usage", {}).get("completion_tokens", 0)
    return elapsed, response.status_code, tokens, retried, answer.get("dabon", {}).get("timings", {})


def run_phase(url: str, headers: dict[str, str], indices: list[int], concurrency: int, candidates: int,
              max_tokens: int, skip_scoring: bool) -> dict[str, Any]:
    """Send the requests ``indices`` with at most ``concurrency`` in flight; return timings."""
    import threading

    import requests

    local = threading.local()

    def call(index: int) -> tuple[float, int, int, int, dict[str, float]]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = {
            "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            "max_tokens": max_tokens, "seed": index,
            "dabon": {"candidates": candidates, "skip_scoring": skip_scoring, "return_candidates": True},
        }
        return one_request(session, url, headers, body)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(call, indices))
    return {"wall_s": time.perf_counter() - start, "results": results}


def summarise(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95/mean latency of successful requests, throughput, retried 503s and errors over phases."""
    results = [result for phase in phases for result in phase["results"]]
    latencies = [s for s, status, _, _, _ in results if status == 200]
    errors = sum(1 for _, status, _, _, _ in results if status != 200)
    wall = sum(phase["wall_s"] for phase in phases)
    tokens = sum(t for _, status, t, _, _ in results if status == 200)
    # the server's own account of each answered request: seconds waiting on each stage
    stages = sorted({stage for *_, timings in results for stage in timings})
    stage_means = {stage: statistics.fmean(timings[stage] for *_, timings in results if stage in timings)
                   for stage in stages}
    return {
        "requests": len(results), "errors": errors, "retried_503": sum(r for _, _, _, r, _ in results),
        "stage_mean_s": stage_means,
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "throughput_rps": (len(results) - errors) / wall if wall else float("nan"),
        "generated_tokens_per_s": tokens / wall if wall else float("nan"),
    }


def measure(url: str, headers: dict[str, str], args: argparse.Namespace, levels: list[int]) -> dict[Any, Any]:
    """Warm up, then both modes at every concurrency level (see the module doc)."""
    out: dict[Any, Any] = {}
    run_phase(url, headers, list(range(args.warmup)), 1, args.n, args.max_new_tokens, False)
    run_phase(url, headers, list(range(args.warmup)), 1, args.n, args.max_new_tokens, True)
    for concurrency in levels:
        first = list(range(args.requests // 2))
        second = list(range(args.requests // 2, args.requests))
        full = [run_phase(url, headers, first, concurrency, args.n, args.max_new_tokens, False)]
        sampling = [run_phase(url, headers, first, concurrency, args.n, args.max_new_tokens, True)]
        sampling.append(run_phase(url, headers, second, concurrency, args.n, args.max_new_tokens, True))
        full.append(run_phase(url, headers, second, concurrency, args.n, args.max_new_tokens, False))
        modes: dict[str, Any] = {"full": summarise(full), "sampling_only": summarise(sampling)}
        modes["overhead_p50"] = modes["full"]["p50_s"] / modes["sampling_only"]["p50_s"]
        modes["overhead_mean"] = modes["full"]["mean_s"] / modes["sampling_only"]["mean_s"]
        out[concurrency] = modes
        print(f"  {concurrency} clients done: overhead p50 x{modes['overhead_p50']:.3f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table (and ``--json`` to a file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (needs serving.allow_skip_scoring=true)")
    parser.add_argument("--backends", default="vllm,hf", help="engines of the in-process apps, in order (default vllm,hf)")
    parser.add_argument("--token-env", default="DABON_API_KEY", help="environment variable with the bearer token, if any")
    parser.add_argument("--adapter", default=None, help="LoRA adapter for the in-process app (default: a random one)")
    parser.add_argument("--layer", type=int, default=12, help="serving layer of the in-process app (default 12)")
    parser.add_argument("--scorer-threads", type=int, default=2,
                        help="torch threads of the scorer replica (default 2, as serve_app/config.yaml)")
    parser.add_argument("--n", type=int, default=4,
                        help="Best-of-N candidates per request (the app's sampling.n, each request's dabon.candidates; "
                             "default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="new tokens per candidate (the app's sampling.max_new_tokens, each request's max_tokens; "
                             "default 48)")
    parser.add_argument("--requests", type=int, default=16, help="requests per mode and concurrency (default 16)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests first (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    backends = [part.strip() for part in args.backends.split(",") if part.strip()]
    if args.requests < 2 or not levels or min(levels) < 1:
        parser.error("--requests must be >= 2 and --concurrency a list of positive integers")
    if not backends or set(backends) - {"vllm", "hf"}:
        parser.error("--backends: expected a comma list of vllm, hf")

    headers = {"Content-Type": "application/json"}
    token = os.environ.get(args.token_env or "", "")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    report: dict[str, Any] = {"n": args.n, "max_new_tokens": args.max_new_tokens, "requests": args.requests,
                              "engines": {}}
    for backend in ([args.url] if args.url else backends):
        url, shutdown = (args.url, None) if args.url else (None, None)
        if url is None:
            started = time.perf_counter()
            url, shutdown = start_app(args, backend)
            print(f"{backend}: app started in {time.perf_counter() - started:.1f} s at {url}", flush=True)
        try:
            report["engines"][backend] = measure(url, headers, args, levels)
        finally:
            if shutdown is not None:
                shutdown()

    print(f"\nBest-of-N load benchmark: N={args.n} candidates, max_new_tokens={args.max_new_tokens}, "
          f"{args.requests} requests per mode")
    print(f"{'engine':<8} {'clients':>7} {'mode':<14} {'p50 s':>7} {'p95 s':>7} {'mean s':>7} {'req/s':>7} {'tok/s':>7} "
          f"{'503s':>5} {'errors':>6}")
    for engine, levels_report in report["engines"].items():
        for concurrency, modes in levels_report.items():
            for mode in ("full", "sampling_only"):
                stats = modes[mode]
                print(f"{engine:<8} {concurrency:>7} {mode:<14} {stats['p50_s']:>7.2f} {stats['p95_s']:>7.2f} "
                      f"{stats['mean_s']:>7.2f} {stats['throughput_rps']:>7.3f} {stats['generated_tokens_per_s']:>7.1f} "
                      f"{stats['retried_503']:>5} {stats['errors']:>6}")
            print(f"{engine:<8} {concurrency:>7} Best-of-N overhead (full / sampling-only): p50 x{modes['overhead_p50']:.3f}, "
                  f"mean x{modes['overhead_mean']:.3f}")
            full, plain = modes["full"]["stage_mean_s"], modes["sampling_only"]["stage_mean_s"]
            if full and plain:
                print(f"{engine:<8} {concurrency:>7} where the time goes (server, mean s): full = sampling "
                      f"{full.get('sampling_s', float('nan')):.2f} + scoring {full.get('scoring_s', float('nan')):.2f}; "
                      f"sampling-only = sampling {plain.get('sampling_s', float('nan')):.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    errors = sum(modes[mode]["errors"] for levels_report in report["engines"].values()
                 for modes in levels_report.values() for mode in ("full", "sampling_only"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
