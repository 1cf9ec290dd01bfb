"""``dabon serve``: the Best-of-N reranker (``serve_app``) on Ray Serve, on this machine or a cluster.

Launch::

    dabon random-adapter --out runs/demo/adapter          # once, if you have no adapter yet
    dabon serve --adapter runs/demo/adapter                # http://127.0.0.1:8000, Ctrl-C stops it
    dabon serve --config serve_app/config.yaml --n 8 --layer 12 --port 8001 \\
        --set sampling.max_new_tokens=512 --set deployments.sampler.autoscaling_config.max_replicas=4
    dabon serve --adapter DIR --backend hf                 # HF generate instead of the vLLM engine
    DABON_API_KEY=... dabon serve --adapter DIR --host 0.0.0.0   # another interface needs a token
    python -m pipelines.serve ...                          # the same flags
    dabon serve --address auto ...                          # deploy onto the running cluster instead

Without ``--address`` a local Ray starts (``RAY_AUTH_MODE=disabled`` unless already set; its
dashboard listens on 127.0.0.1 only, port 8265 or the next free one) and stops with the server.
When Ray cannot start or be reached, the command prints one line saying why and exits 2. The app config is the ``args`` of one application in a
Serve config file (default: the packaged ``serve_app/config.yaml``), with the flags and
``--set KEY=VALUE`` dotted overrides applied on top; ``http_options`` of that file give the
proxy's timeouts, the flags give host and port.

A local Ray runs in a child process in its own session (``supervise``): a signal sent to the
whole process group of ``dabon serve`` (a terminal's Ctrl-C, systemd's default stop, ``kill --
-PGID``) reaches only this process, which forwards it to the child, so Ray's processes stay up
until the requests in flight are answered. Once the child has exited, however it stopped, every
process left in its session (Ray workers, a vLLM engine core) is stopped too: none outlives the
command. If this process is killed outright, the child notices within a second and drains.

SIGINT or SIGTERM drains: the ingress replicas stop admitting (new requests get 503 with
``Retry-After``, ``/healthz`` 503), the requests in flight are answered, for at most
``serving.drain_timeout_s`` (default 30 s); then the app is deleted, Serve (and a local Ray)
shut down, and the command exits 0. A signal while the app is still deploying drains too (the
ingress replicas already up may have admitted requests: the proxy routes to them before the app
as a whole is ready), which takes no time when nothing was admitted, then stops.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from actors.config import ConfigError, RayConfig, apply_override, read_yaml
from actors.errors import UserError
from actors.settings import get_logger
from pipelines.args import add_output_arguments, command_main, set_flags

logger = get_logger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"
LOOPBACK_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def select_application(serve_config: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The application entry named ``name`` (or the only/first one) of a Serve config mapping."""
    applications = serve_config.get("applications")
    if not isinstance(applications, list) or not applications:
        raise ConfigError("the Serve config has no applications list")
    if name is None:
        return applications[0]
    for application in applications:
        if application.get("name") == name:
            return application
    raise ConfigError(f"--app {name!r}: no such application (have {[a.get('name') for a in applications]})")


def app_args(application: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The application's ``args`` with the command-line flags and ``--set`` overrides applied."""
    data = copy.deepcopy(application.get("args") or {})
    set_flags(data, {"model.base": args.base, "sampling.n": args.n, "scoring.layer": args.layer,
                     "generator.backend": args.backend})
    if args.backend is not None and args.backend != (application.get("args") or {}).get("generator", {}).get("backend"):
        data["generator"]["options"] = {}  # the file's options belong to its backend
    if args.adapter is not None:
        model = data.setdefault("model", {})
        model["adapter"] = args.adapter
        model.pop("finetuned", None)
    if args.n is not None:
        sampling = data.setdefault("sampling", {})
        sampling["max_n"] = max(int(sampling.get("max_n", 8)), args.n)
    for override in args.set or []:
        apply_override(data, override)
    return data


def http_options(serve_config: dict[str, Any], host: str, port: int, request_timeout_s: float) -> dict[str, Any]:
    """``serve.start`` http options: the file's, with ``host``/``port`` from the flags and a proxy
    timeout at least 10 s beyond the ingress's own (so the ingress's JSON 504 answers first)."""
    options = dict(serve_config.get("http_options") or {})
    options.update(host=host, port=port)
    proxy_timeout = options.get("request_timeout_s")
    if proxy_timeout is None or proxy_timeout < request_timeout_s + 10:
        options["request_timeout_s"] = math.ceil(request_timeout_s + 10)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dabon serve`` options."""
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="Serve config file whose application args configure the app (default: serve_app/config.yaml)")
    parser.add_argument("--app", default=None, help="application name in --config (default: the first)")
    parser.add_argument("--base", default=None, help="base model: alias, local dir, .gguf file or Hub id")
    parser.add_argument("--adapter", default=None, help="peft LoRA adapter directory (the fine-tuned model)")
    parser.add_argument("--n", type=int, default=None,
                        help="Best-of-N candidates per request (sampling.n; raises sampling.max_n when larger); "
                             "a request's own n is the number of ranked choices returned")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=None,
                        help="sampler engine (generator.backend; default: the config's, vllm)")
    parser.add_argument("--layer", type=int, default=None, help="hidden-state index of the latent similarity")
    parser.add_argument("--host", default="127.0.0.1", help="interface of Serve's HTTP proxy (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxy (default 8000)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="dotted override of the app args, e.g. sampling.max_new_tokens=512 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to deploy onto (e.g. auto); default: start a local Ray")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of a local Ray (default: the cores, or what min_replicas need if more)")
    add_output_arguments(parser)


class StopSignal:
    """SIGINT/SIGTERM handling of ``dabon serve`` once ``install`` ran (call it right after
    ``ray.init``, which installs Ray's own SIGTERM handler).

    While the app is still starting (``serving`` false) a signal raises ``KeyboardInterrupt`` in
    the main thread, so a deployment that would wait forever (e.g. replicas waiting for CPUs) can
    be stopped; once serving, it only records the signal and ``wait`` returns.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.serving = False
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Route SIGINT and SIGTERM to this object (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
        self._event.set()
        if not self.serving:
            raise KeyboardInterrupt

    def wait(self) -> int:
        """Block until a signal arrived (at once if one already did); return its number."""
        while not self._event.wait(timeout=1.0):
            pass
        return int(self.received or signal.SIGTERM)

    def restore(self) -> None:
        """Reinstall the handlers that ``install`` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


SUPERVISOR_ENV = "DABON_SERVE_SUPERVISOR"  # pid of the supervising `dabon serve`, set in its child
ARGS_ENV = "DABON_SERVE_ARGS"  # the parsed flags, as JSON, for the child
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}


def session_processes(session: int) -> list[int]:
    """Pids of the live processes of ``session`` (Linux ``/proc``; empty elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(entry.name)) == session:
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def stop_session(session: int, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process left in ``session``, SIGKILL those alive after ``grace_s``; returns
    the pids that were found."""
    found = session_processes(session)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(session):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.1)
    return found


def supervise(args: argparse.Namespace) -> int:
    """Run the server (``run`` with the same flags) in a child process in its own session, forward
    SIGINT/SIGTERM (SIGHUP as SIGTERM) to it, wait for it, then stop whatever is left in its
    session; returns the child's exit code."""
    flags = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if not callable(value)}
    env = {**os.environ, SUPERVISOR_ENV: str(os.getpid()), ARGS_ENV: json.dumps(flags)}
    child = subprocess.Popen([sys.executable, "-c", "import sys; from pipelines.serve import supervised_main; "
                              "sys.exit(supervised_main())"], env=env, start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(FORWARDED[signal.Signals(signum)])

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = child.wait()
    finally:
        left = stop_session(child.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        logger.info("stopped %d processes the server left behind", len(left))
    return code


def supervised_main() -> int:
    """The child's entry point (see ``supervise``): ``run`` with the parent's flags; when the
    parent disappears, stop as on SIGTERM."""
    from pipelines.args import run_guarded

    data = json.loads(os.environ.pop(ARGS_ENV))
    data["config"] = Path(data["config"])
    parent = int(os.environ[SUPERVISOR_ENV])

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, daemon=True, name="dabon-watch-parent").start()
    return run_guarded(run, argparse.Namespace(**data))


def drain(control: Any, timeout_s: float, poll_s: float = 0.2, settle_s: float = 0.5) -> bool:
    """Tell the ingress replicas to drain and wait until every one reports nothing in flight, for
    at most ``timeout_s``; ``settle_s`` more lets the last answers leave the proxy. Returns whether
    they drained in time."""
    import ray

    from serve_app.app import drained

    ray.get(control.start.remote())
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(poll_s)
        status = ray.get(control.status.remote())
        if drained(status) and any(r["draining"] for r in status["replicas"].values()) or not status["replicas"]:
            time.sleep(settle_s)
            return True
        if time.monotonic() >= deadline:
            in_flight = sum(r["in_flight"] for r in status["replicas"].values())
            logger.warning("drain timeout (%.0f s): %d requests still in flight are dropped", timeout_s, in_flight)
            return False


def run(args: argparse.Namespace) -> int:
    """Run ``dabon serve`` with parsed arguments; blocks until SIGINT/SIGTERM; returns the exit code."""
    from actors.runtime import init_ray, quiet_libraries
    from serve_app.app import DRAIN_NAMESPACE, DrainControl, absolute_model_paths, build_app, drain_actor_name, parse_app_config
    from serve_app.options import required_cpus, resolve_api_token

    quiet_libraries(args.verbose)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: expected 1..65535, got {args.port}")
    serve_config = read_yaml(args.config)
    application = select_application(serve_config, args.app)
    data = app_args(application, args)
    config = absolute_model_paths(parse_app_config(data))
    token = resolve_api_token(config.auth)  # build_app resolves it again, for the replicas
    if not is_loopback(args.host) and token is None:
        raise ConfigError(
            f"--host {args.host}: serving beyond loopback needs bearer auth; set the environment variable "
            f"{config.auth.token_env or 'named by auth.token_env'} (or auth.token_file) and keep the port behind TLS"
        )
    app = build_app(data)  # checks the model names and adapter before Ray starts

    local = args.address is None
    if local and SUPERVISOR_ENV not in os.environ and sys.platform.startswith("linux"):
        return supervise(args)  # Ray in its own session, so that a group signal cannot stop it before the drain
    import ray
    from ray import serve

    env_vars = {str(k): str(v) for k, v in ((application.get("runtime_env") or {}).get("env_vars") or {}).items()}
    cpus = None
    if local:
        # every deployment's min_replicas must fit; more logical CPUs than cores would only oversubscribe
        needed = math.ceil(required_cpus(config, at="min_replicas"))
        cpus = args.num_cpus if args.num_cpus is not None else max(os.cpu_count() or 1, needed)
    try:
        init_ray(RayConfig(address=args.address, num_cpus=cpus), log_to_driver=True, verbose=args.verbose, env_vars=env_vars)
    except (ConnectionError, RuntimeError, OSError, ValueError) as err:  # Ray's own message, without its traceback
        where = f"the Ray cluster at {args.address!r}" if args.address else "a local Ray"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"Ray did not start ({where}): {reason}") from None
    name = application.get("name") or "dabon"
    stop = StopSignal()
    stop.install()
    control = None
    try:
        control = DrainControl.options(name=drain_actor_name(name), namespace=DRAIN_NAMESPACE).remote()
        serve.start(http_options=http_options(serve_config, args.host, args.port, config.serving.request_timeout_s))
        try:
            serve.run(app, name=name, route_prefix=application.get("route_prefix") or "/")
        except RuntimeError as err:  # a replica failed to start; Serve's message carries its error
            raise UserError(f"the app did not start: {str(err).strip().splitlines()[-1]}") from err
        stop.serving = True
        logger.info(
            "serving %s (%s + %s, %s engine, layer %d) at http://%s:%d/v1 (auth %s); Ctrl-C stops",
            config.serving.model_name, config.model.base, config.model.adapter or config.model.finetuned,
            config.generator.backend, config.scoring.layer, args.host, args.port, "on" if token else "off",
        )
        signum = stop.wait()
        logger.info("received %s: draining (at most %.0f s)", signal.Signals(signum).name, config.serving.drain_timeout_s)
    except KeyboardInterrupt:  # a stop asked for while deploying: as clean as one after
        logger.info("interrupted while starting: draining what was admitted, then shutting down")
    finally:
        stop.serving = True  # a second signal during shutdown must not interrupt it
        try:
            # also when interrupted while deploying: the ingress replicas answer (and admit) as soon
            # as they are up, before serve.run returns
            if control is not None:
                drain(control, config.serving.drain_timeout_s)
            if local:
                serve.shutdown()
            else:
                serve.delete(name)
                if control is not None:
                    ray.kill(control)
        finally:
            ray.shutdown()
            stop.restore()
    return 0


main = command_main("python -m pipelines.serve", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
