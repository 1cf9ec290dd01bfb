"""One HTTP client for OpenAI-compatible ``/v1/chat/completions`` endpoints (sampler and judge).

Retries with exponential backoff and jitter on connection errors, timeouts, 429 and 5xx
(a ``Retry-After`` header wins over the backoff); any other 4xx is raised at once with the
server's own message. One ``requests.Session`` per thread, so callers can bound their
concurrency with a thread pool.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any

from actors.settings import get_logger, secret_from_env

logger = get_logger(__name__)


class EndpointError(RuntimeError):
    """A request that failed for good; ``status`` is the last HTTP status (None without one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), ``None`` if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def server_message(response: Any) -> str:
    """The error message of an HTTP error answer (OpenAI, vLLM or FastAPI shape), else its text."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if payload.get(key):
                return str(payload[key])
    return str(payload)[:500]


def chat_completions_url(base_url: str) -> str:
    """``http://host:port[/v1]`` -> ``http://host:port/v1/chat/completions``."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url: expected http(s)://host:port[/v1], got {base_url!r}")
    root = base_url.rstrip("/")
    return (root if root.endswith("/v1") else root + "/v1") + "/chat/completions"


class ChatEndpoint:
    """POSTs chat-completion bodies to one endpoint with retries (see module doc).

    ``api_key`` or ``api_key_env`` (the *name* of an environment variable) gives a Bearer key.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("expected max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.url = chat_completions_url(base_url)
        if api_key is None and api_key_env:
            api_key = secret_from_env(api_key_env)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._local = threading.local()

    def _session(self) -> Any:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _backoff(self, attempt: int) -> float:
        # jitter spreads clients that failed together
        return min(self.max_backoff_s, self.backoff_s * (2**attempt)) * (1.0 + 0.25 * random.random())

    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``; the decoded JSON answer, or ``EndpointError`` once retries are spent."""
        import requests

        last_error, status = "", None
        for attempt in range(self.max_retries + 1):
            try:
                response = self._session().post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except requests.Timeout:
                last_error, delay, status = f"timed out after {self.timeout_s} s", self._backoff(attempt), None
            except requests.ConnectionError as err:
                last_error, delay, status = f"connection error: {err}", self._backoff(attempt), None
            else:
                status = response.status_code
                if status == 200:
                    try:
                        payload = response.json()
                    except ValueError as err:
                        raise EndpointError(f"{self.url} answered 200 with a body that is not JSON: {err}", 200) from err
                    if not isinstance(payload, dict):
                        raise EndpointError(f"{self.url} answered 200 with {type(payload).__name__}, expected an object", 200)
                    return payload
                message = server_message(response)
                if status != 429 and status < 500:
                    raise EndpointError(f"{self.url} answered HTTP {status}: {message}", status)
                last_error = f"HTTP {status}: {message}"
                waited = retry_after_seconds(response.headers.get("Retry-After"))
                delay = min(self.max_backoff_s, waited) if waited is not None else self._backoff(attempt)
            if attempt < self.max_retries:
                logger.warning("%s: %s; retry %d/%d in %.2f s", self.url, last_error, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise EndpointError(f"{self.url} failed after {self.max_retries + 1} attempts: {last_error}", status)
