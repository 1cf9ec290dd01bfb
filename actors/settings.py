"""Environment knobs and logging, read in this one module (never at import time elsewhere).

``DABON_CACHE_DIR``: where de-quantised GGUF models are kept
(default ``$XDG_CACHE_HOME/dabon`` or ``~/.cache/dabon``).
``DABON_LOG_LEVEL``: log level of dabon's loggers (default ``INFO``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


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
