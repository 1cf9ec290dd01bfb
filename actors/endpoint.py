"""OpenAI-compatible endpoints (vLLM, SGLang, this project's Serve app) through the official
``openai`` SDK, for the sampler and the judge.

The SDK retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff and
honours the server's ``Retry-After``; any other 4xx is raised at once. ``call`` turns what it
raises into one ``EndpointError`` that names the endpoint, the HTTP status and the server's own
message. Servers that return the generated token ids (vLLM's and dabon's ``return_token_ids``
extension) are read with ``extra_field``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from actors.settings import get_logger, secret_from_env

logger = get_logger(__name__)

T = TypeVar("T")


class EndpointError(RuntimeError):
    """A request that failed for good; ``status`` is the last HTTP status (``None`` without one)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def api_root(base_url: str) -> str:
    """``http://host:port[/v1]`` -> ``http://host:port/v1`` (what the SDK calls ``base_url``)."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url: expected http(s)://host:port[/v1], got {base_url!r}")
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def openai_client(base_url: str, api_key: str | None = None, api_key_env: str | None = None,
                  timeout_s: float = 60.0, max_retries: int = 3) -> Any:
    """An ``openai.OpenAI`` client for ``base_url``. The key is ``api_key``, else the value of the
    environment variable named ``api_key_env`` (secrets never go on a command line), else a
    placeholder for servers without auth."""
    import openai

    if api_key is None and api_key_env:
        api_key = secret_from_env(api_key_env)
    return openai.OpenAI(base_url=api_root(base_url), api_key=api_key or "no-key", timeout=timeout_s,
                         max_retries=max_retries)


def server_message(err: Any) -> str:
    """The message of an SDK status error: the OpenAI-shaped body's ``error.message`` when present."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(err, "message", err))


def call(where: str, request: Callable[[], T], retries: int) -> T:
    """Run one SDK request; its failures become ``EndpointError`` naming ``where``."""
    import openai

    try:
        return request()
    except openai.APITimeoutError as err:
        raise EndpointError(f"{where} failed after {retries + 1} attempts: timed out") from err
    except openai.APIConnectionError as err:
        raise EndpointError(f"{where} failed after {retries + 1} attempts: connection error ({err})") from err
    except openai.APIStatusError as err:
        status = err.status_code
        retried = status in (408, 409, 429) or status >= 500
        prefix = f"{where} failed after {retries + 1} attempts: " if retried else f"{where} answered "
        raise EndpointError(f"{prefix}HTTP {status}: {server_message(err)}", status) from err


def extra_field(model: Any, name: str) -> Any:
    """A field the OpenAI schema lacks but a server sent (``token_ids``), else ``None``."""
    extra = getattr(model, "model_extra", None) or {}
    return extra.get(name, getattr(model, name, None))
