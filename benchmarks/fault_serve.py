"""Fault and load probes of the Serve app (issue 20): a burst of clients, slow senders, and a
sampler replica killed with SIGKILL under load. Bounded loops, 127.0.0.1 only.

Run from the repository root (a few minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python benchmarks/fault_serve.py                        # vLLM engine, SmolLM2 + random LoRA
    HF_HUB_OFFLINE=1 python benchmarks/fault_serve.py --backend hf --burst 32 --max-tokens 32

What it does: starts a local Ray and the app (``serve_app.app.build_app``) on a free loopback port
with the shipped ``serve_app/config.yaml`` args (bearer auth on; ``--set`` overrides them), then:

1. **burst**: ``--burst`` clients send one chat completion each at the same moment; prints the
   answers by status, p50/p95 latency of the admitted (200) ones against
   ``serving.target_latency_s``, and whether every 503 carried ``Retry-After``;
2. **slow senders**: ``--slow`` connections declare a 1000-byte body and send 12 bytes; prints
   how long ``/healthz`` and ``/v1/models`` took meanwhile and what the slow ones were answered;
3. **kill**: ``--clients`` clients send chat completions in a loop; after ``--kill-after`` seconds
   the sampler replica's process gets SIGKILL; the loop runs until the first answer after the
   kill (at most ``--kill-window`` seconds); prints the answers by status, the longest wait, any
   503 without ``Retry-After``, and the time from the kill to the first answer.

The last line is a JSON summary; the exit code is 1 when any answer had a 5xx status other than 503.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BASE = "smollm2-135m-instruct"
TOKEN = "fault-probe-token"
APP = "dabon"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(backend: str, overrides: list[str]) -> tuple[str, int, dict]:
    """Local Ray + the app with the shipped args on a free loopback port; returns URL, port, args."""
    import ray
    from ray import serve

    from actors.config import apply_override, read_yaml
    from actors.models import write_random_adapter
    from serve_app.app import build_app

    adapter = str(Path(tempfile.gettempdir()) / "dabon-bench-adapter")
    if not (Path(adapter) / "adapter_config.json").is_file():
        write_random_adapter(BASE, adapter, seed=0)
    args = read_yaml(REPO / "serve_app" / "config.yaml")["applications"][0]["args"]
    args["model"] = {"base": BASE, "adapter": adapter}
    if backend != args["generator"]["backend"]:
        args["generator"] = {"backend": backend}
    args["auth"] = {"token_env": "DABON_FAULT_TOKEN", "required": True}
    args["deployments"]["ingress"]["ray_actor_options"] = {"num_cpus": 0.25}
    for override in overrides:
        apply_override(args, override)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}})
    os.environ["DABON_FAULT_TOKEN"] = TOKEN
    app = build_app(args)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": args["serving"]["request_timeout_s"] + 10})
    serve.run(app, name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}", port, args


def wait_ready(url: str, timeout_s: float = 600) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while requests.get(url + "/healthz", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready in {timeout_s} s")
        time.sleep(0.5)


def chat(url: str, index: int, max_tokens: int, timeout: float) -> dict:
    """One chat completion; returns status, seconds, Retry-After."""
    import requests

    started = time.monotonic()
    try:
        response = requests.post(url + "/v1/chat/completions", timeout=timeout, headers={"Authorization": f"Bearer {TOKEN}"},
                                 json={"messages": [{"role": "user", "content": f"Tell me something, {index}."}],
                                       "max_tokens": max_tokens, "seed": index})
        status, retry_after = response.status_code, response.headers.get("Retry-After")
    except Exception as err:  # noqa: BLE001 - a connection error is a result here
        status, retry_after = f"error: {type(err).__name__}", None
    return {"status": status, "seconds": time.monotonic() - started, "retry_after": retry_after, "sent": started}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def counts(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for result in results:
        out[str(result["status"])] = out.get(str(result["status"]), 0) + 1
    return out


def burst(url: str, clients: int, max_tokens: int, timeout: float) -> dict:
    barrier = threading.Barrier(clients)

    def one(index: int) -> dict:
        barrier.wait()
        return chat(url, index, max_tokens, timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(clients)))
    admitted = [r["seconds"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    return {"by_status": counts(results), "admitted_p50_s": percentile(admitted, 0.5), "admitted_p95_s": percentile(admitted, 0.95),
            "refused_max_s": max((r["seconds"] for r in refused), default=None),
            "refused_without_retry_after": sum(r["retry_after"] is None for r in refused)}


def slow_senders(url: str, port: int, connections: int, wait_s: float) -> dict:
    import requests

    sockets = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + f"Authorization: Bearer {TOKEN}\r\n".encode()
                     + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"messages":')
        sockets.append(sock)
    time.sleep(1.0)
    probes = {}
    for path, headers in (("/healthz", {}), ("/v1/models", {"Authorization": f"Bearer {TOKEN}"})):
        started = time.monotonic()
        try:
            status = requests.get(url + path, headers=headers, timeout=10).status_code
        except Exception as err:  # noqa: BLE001
            status = f"error: {type(err).__name__}"
        probes[path] = {"status": status, "seconds": round(time.monotonic() - started, 3)}
    answers: dict[str, int] = {}
    for sock in sockets:
        sock.settimeout(wait_s)
        try:
            head = sock.recv(64)
            status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed"
        except OSError:
            status = "no answer"
        answers[status] = answers.get(status, 0) + 1
        sock.close()
    return {"probes": probes, "slow_answers": answers}


def sampler_pids() -> list[int]:
    title = f"ServeReplica:{APP}:SamplerDeployment".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if title in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_under_load(url: str, clients: int, kill_after_s: float, window_s: float, max_tokens: int, timeout: float) -> dict:
    results: list[dict] = []
    stop = threading.Event()
    killed: dict[str, float] = {}

    def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            result = chat(url, 1000 * index + n, max_tokens, timeout)
            results.append(result)
            n += 1
            if result["status"] == 200 and "at" in killed and result["sent"] > killed["at"]:
                stop.set()
            elif result["status"] != 200:
                time.sleep(min(2.0, float(result["retry_after"] or 1)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(kill_after_s)
    pids = sampler_pids()
    killed["at"] = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stop.wait(timeout=window_s)
    stop.set()
    for thread in threads:
        thread.join()
    after = [r for r in results if r["sent"] + r["seconds"] > killed["at"]]
    first = min((r["sent"] + r["seconds"] for r in after if r["status"] == 200 and r["sent"] > killed["at"]), default=None)
    return {"killed_pids": pids, "by_status_after_kill": counts(after),
            "longest_wait_s": max((r["seconds"] for r in after), default=None),
            "refused_without_retry_after": sum(r["status"] == 503 and r["retry_after"] is None for r in after),
            "first_answer_after_kill_s": None if first is None else round(first - killed["at"], 1)}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start the app, run the three probes, print the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="sampler engine (default vllm)")
    parser.add_argument("--burst", type=int, default=32, help="clients of the burst (default 32)")
    parser.add_argument("--slow", type=int, default=24, help="slow-sending connections (default 24)")
    parser.add_argument("--clients", type=int, default=4, help="clients during the kill (default 4)")
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before the kill (default 10)")
    parser.add_argument("--kill-window", type=float, default=300.0, help="longest wait for an answer after the kill (default 300)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each chat (default 64)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the shipped app args")
    parser.add_argument("--only", default="burst,slow,kill", help="probes to run (default burst,slow,kill)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    started = time.perf_counter()
    url, port, app_args = start_app(args.backend, args.set)
    wait_ready(url)
    print(f"{args.backend}: app ready in {time.perf_counter() - started:.1f} s at {url}", flush=True)
    timeout = app_args["serving"]["request_timeout_s"] + 20
    summary: dict = {"backend": args.backend, "target_latency_s": app_args["serving"].get("target_latency_s"),
                     "request_timeout_s": app_args["serving"]["request_timeout_s"]}
    probes = args.only.split(",")
    try:
        if "burst" in probes:
            summary["burst"] = burst(url, args.burst, args.max_tokens, timeout)
            print("burst:", json.dumps(summary["burst"]), flush=True)
        if "slow" in probes:
            body_timeout = app_args["serving"].get("body_timeout_s", 10)
            summary["slow"] = slow_senders(url, port, args.slow, body_timeout + 15)
            print("slow senders:", json.dumps(summary["slow"]), flush=True)
        if "kill" in probes:
            summary["kill"] = kill_under_load(url, args.clients, args.kill_after, args.kill_window, args.max_tokens, timeout)
            print("kill -9 of the sampler:", json.dumps(summary["kill"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(summary))
    statuses = [s for part in ("burst", "kill") for s in (summary.get(part, {}).get("by_status")
                                                          or summary.get(part, {}).get("by_status_after_kill") or {})]
    return 1 if any(s.isdigit() and int(s) >= 500 and int(s) != 503 for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
