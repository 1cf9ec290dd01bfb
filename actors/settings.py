"""Environment knobs and logging, read in this one module (never at import time elsewhere).

``DABON_CACHE_DIR``: where de-quantised GGUF models are kept
(default ``$XDG_CACHE_HOME/dabon`` or ``~/.cache/dabon``).
``DABON_LOG_LEVEL``: log level of dabon's loggers (default ``INFO``).
``DABON_STAR1``: a local copy of STAR-1 (JSON), used when a recipe gives no path.
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``: never contact the Hugging Face Hub.
API keys are read from the environment variable a config names (``api_key_env``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from actors.config import ConfigError

# Environment variables a driver hands on to its Ray workers (offline mode, caches, data paths,
# vLLM's CPU knobs), so that workers resolve models and data as the driver does.
FORWARDED_VARIABLES = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "DABON_CACHE_DIR", "DABON_STAR1", "DABON_LOG_LEVEL",
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
)


def cache_dir() -> Path:
    """Root of dabon's local cache."""
    explicit = os.environ.get("DABON_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dabon"


def model_cache_dir() -> Path:
    """Where materialised (de-quantised) models live."""
    return cache_dir() / "models"


_TRUE = {"1", "true", "yes", "on"}


def hub_offline_reason() -> str | None:
    """``"HF_HUB_OFFLINE=1"`` (or ``HF_DATASETS_OFFLINE=...``) when the Hub must not be contacted, else ``None``."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        value = os.environ.get(name, "").strip()
        if value.lower() in _TRUE:
            return f"{name}={value}"
    return None


_HUB_PROBES: dict[str, str | None] = {}


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be used now, else ``None``: ``hub_offline_reason()``, or a
    failed TCP connection to its host (``HF_ENDPOINT``, default https://huggingface.co), tried once
    per process with ``timeout_s``. Without it, a machine with no route to the Hub waits out the
    Hub client's retries (92 s of back-off in one offline quickstart) before a fallback can run."""
    reason = hub_offline_reason()
    if reason is not None:
        return reason
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    if endpoint not in _HUB_PROBES:
        parsed = urlparse(endpoint)
        host, port = parsed.hostname or endpoint, parsed.port or (80 if parsed.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            _HUB_PROBES[endpoint] = None
        except OSError as err:
            _HUB_PROBES[endpoint] = f"{endpoint} unreachable: {type(err).__name__}: {err}"
    return _HUB_PROBES[endpoint]


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def star1_path() -> Path | None:
    """``$DABON_STAR1``: a local STAR-1 JSON file, or ``None`` when unset."""
    value = os.environ.get("DABON_STAR1")
    return Path(value).expanduser() if value else None


def secret_from_env(variable: str, option: str = "api_key_env") -> str:
    """The value of the environment variable named by ``option`` (secrets never go on a command line)."""
    value = os.environ.get(variable, "")
    if not value:
        raise ConfigError(f"{option}: the environment variable {variable!r} is not set or empty")
    return value


def forwarded_environment() -> dict[str, str]:
    """The ``FORWARDED_VARIABLES`` set in this process."""
    return {name: os.environ[name] for name in FORWARDED_VARIABLES if name in os.environ}


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``dabon`` hierarchy with one stderr handler."""
    root = logging.getLogger("dabon")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("DABON_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return root.getChild(name.split(".")[-1]) if not name.startswith("dabon") else logging.getLogger(name)
