"""Schema-driven fuzzing of the Serve app: schemathesis on the app's own OpenAPI document.

Run from the repository root (about 10 minutes on 2 CPU cores with the defaults)::

    HF_HUB_OFFLINE=1 python benchmarks/fuzz_serve.py                      # vLLM engine, 100 cases per operation
    HF_HUB_OFFLINE=1 python benchmarks/fuzz_serve.py --backend hf --max-examples 30
    HF_HUB_OFFLINE=1 python benchmarks/fuzz_serve.py --small-limits                 # quick: 8 new tokens, 512-token prompts

What it does: starts a local Ray and the app (``serve_app.app.build_app``) on a free port of
127.0.0.1 with SmolLM2-135M-Instruct and a random LoRA adapter, bearer auth on, and small
the shipped limits of ``serve_app/config.yaml`` (``sampling``, ``scoring``, ``serving`` and the
engine's ``max_model_len``, so that the context limit and every bound are fuzzed as deployed; the
valid requests it finds can then be slow), or ``--small-limits`` (quick answers, 512-token
prompts, as before); runs
``schemathesis run http://127.0.0.1:PORT/openapi.json`` (all phases: examples, coverage,
fuzzing, in positive and negative mode) with the check ``not_a_server_error`` and the token as
a header; records every exchange in a HAR file; prints the answers per operation and status.
The exit code is 1 when any answer had a 5xx status (the target is none).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BASE = "smollm2-135m-instruct"
TOKEN = "fuzz-token"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shipped_args() -> dict:
    """The ``args`` of the shipped ``serve_app/config.yaml``."""
    from actors.config import read_yaml

    return read_yaml(REPO / "serve_app" / "config.yaml")["applications"][0]["args"]


def start_app(backend: str, adapter: str | None, small_limits: bool = False) -> str:
    """Local Ray + the app on a free loopback port; returns its base URL."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    if adapter is None:
        from actors.models import write_random_adapter

        adapter = str(Path(tempfile.gettempdir()) / "dabon-bench-adapter")
        if not (Path(adapter) / "adapter_config.json").is_file():
            write_random_adapter(BASE, adapter, seed=0)
    shipped = shipped_args()
    generator: dict = {"backend": backend}
    if backend == "vllm":
        generator["options"] = dict(shipped["generator"]["options"])
    sampling = dict(shipped["sampling"])
    serving = {**shipped["serving"], "request_timeout_s": 60}
    if small_limits:
        sampling = {"n": 2, "max_n": 4, "max_new_tokens": 4, "max_new_tokens_limit": 8,
                    "max_prompt_tokens": 512, "max_prompt_chars": 4096}
        serving = {"request_timeout_s": 60, "max_body_bytes": 65536}
    config = {
        "model": {"base": BASE, "adapter": adapter},
        "generator": generator,
        "sampling": sampling,
        "scoring": dict(shipped["scoring"]),
        "serving": serving,
        "auth": {"token_env": "DABON_FUZZ_TOKEN", "required": True},
        "deployments": {
            "ingress": {"ray_actor_options": {"num_cpus": 0.25}},
            "sampler": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 1}},
            "scorer": {"ray_actor_options": {"num_cpus": 1}},
        },
    }
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}})
    os.environ["DABON_FUZZ_TOKEN"] = TOKEN
    app = build_app(config)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 90})
    serve.run(app, name="dabon", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the app, fuzz it, print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="sampler engine (default vllm)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter (default: a random one)")
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="schemathesis seed (default 0)")
    parser.add_argument("--small-limits", action="store_true",
                        help="tiny sampling limits for a quick run instead of the shipped serve_app/config.yaml ones")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dabon-fuzz",
                        help="directory for the HAR record and schemathesis' report")
    args = parser.parse_args(argv)

    from ray import serve
    import ray

    started = time.perf_counter()
    url = start_app(args.backend, args.adapter, args.small_limits)
    print(f"{args.backend}: app started in {time.perf_counter() - started:.1f} s at {url}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    har = args.out / "exchanges.har"
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
        "--max-examples", str(args.max_examples), "--seed", str(args.seed), "-H", f"Authorization: Bearer {TOKEN}",
        "--request-timeout", "120", "--report", "har", "--report-har-path", str(har), "--workers", "1", "--no-color",
        "--suppress-health-check", "all", "--generation-database", "none",
    ]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    elapsed = time.perf_counter() - started
    (args.out / "schemathesis.log").write_text(result.stdout + result.stderr)
    entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in entries:
        request = entry["request"]
        path = request["url"].split("127.0.0.1", 1)[-1].split(":", 1)[-1]
        path = "/" + path.split("/", 1)[1] if "/" in path else path
        counts[f"{request['method']} {path.split('?')[0]}"][entry["response"]["status"]] += 1
    total = sum(sum(c.values()) for c in counts.values())
    server_errors = sum(n for c in counts.values() for status, n in c.items() if status >= 500)
    print(f"\nschemathesis {args.max_examples} examples/operation, seed {args.seed}: {total} requests in {elapsed:.0f} s, "
          f"schemathesis exit code {result.returncode}")
    for operation in sorted(counts):
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(counts[operation].items()))
        print(f"  {operation:<28} {statuses}")
    print(f"5xx answers: {server_errors}   (log: {args.out / 'schemathesis.log'})")
    if not entries:
        print(result.stdout[-3000:] + result.stderr[-3000:])
        return 1
    return 1 if server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
