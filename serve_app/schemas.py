"""Request models and error bodies of the HTTP API (OpenAI-shaped where OpenAI defines one).

- ``ChatCompletionRequest``: ``POST /v1/chat/completions``. ``n`` is the number of Best-of-N
  *candidates*; one choice (the selected candidate) is returned. OpenAI parameters this server
  does not implement are accepted only at their neutral value (``stop: null``,
  ``presence_penalty: 0``, ...) so that stock clients work; any other value, and any unknown
  field, is a 400 naming the field. ``stream: true`` is a 400: Best-of-N can only answer once
  all N candidates are complete.
- ``ScoreRequest``: ``POST /v1/score`` with caller-supplied responses (text, and optionally the
  exact token ids, as ``dabon score`` input rows accept).
- ``ApiError`` / ``error_body``: every error is ``{"error": {"message", "type", "param", "code"}}``
  with the HTTP status on the exception; messages never carry a stack trace.

Limits that depend on the app config (``max_n``, ``max_tokens``, prompt length) are checked in
``serve_app.service``; the models here hold only the static rules.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Values of OpenAI parameters this server does not implement that mean "not used".
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "stop": (None, "", []),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "stream_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}


class ApiError(Exception):
    """An HTTP error answer: ``status``, OpenAI ``type``, the offending ``param`` (dotted), extra ``headers``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error shape)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _location(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "content", "str")`` -> ``messages[0].content`` (union member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in str(part) or str(part).startswith("function-"):
            continue  # pydantic names the union member it tried; the client only needs the field
        else:
            out += ("." if out else "") + str(part)
    return out


_LEADING_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def validation_error(err: ValidationError) -> ApiError:
    """A 400 ``ApiError`` naming the first invalid field (all problems listed in the message).

    Field errors carry their location; errors of model-level rules start with ``field: `` and
    that field is taken as the location.
    """
    problems: list[str] = []
    first_param = None
    for item in err.errors(include_url=False, include_context=False, include_input=False):
        message = item["msg"].removeprefix("Value error, ")
        param = _location(tuple(item["loc"]))
        match = _LEADING_FIELD.match(message)
        if match and not param:
            param, message = match.group(1), message[match.end():]
        param = param or "body"
        first_param = first_param or param
        problem = f"{param}: {message}"
        if problem not in problems:
            problems.append(problem)
    return ApiError(400, "; ".join(problems), param=first_param, code="invalid_value")


def parse(model: type[BaseModel], body: bytes | str) -> Any:
    """Validate a raw JSON request body as ``model`` (pydantic's strict JSON mode: ``"4"`` is not an
    integer); malformed JSON and invalid fields become a 400 ``ApiError`` naming the field."""
    if not body or not str(body if isinstance(body, str) else body.decode("utf-8", "replace")).strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", param="body")
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextPart(_Strict):
    """One part of a multi-part message content; only text parts are served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message: a role the chat template knows and text content (string or text parts)."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        """The content as one string (text parts joined with newlines, as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class DabonOptions(_Strict):
    """The ``dabon`` extension object of a chat request.

    ``return_candidates``: add a top-level ``dabon`` object with all N candidates, their
    latent similarity at the serving layer, and the selected index.
    ``skip_scoring``: return candidate 0 unscored (benchmarks; refused unless the server allows it).
    """

    return_candidates: bool = False
    skip_scoring: bool = False


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions`` body (see the module doc)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    user: str | None = None
    dabon: DabonOptions = DabonOptions()
    # OpenAI parameters accepted at their neutral value only (NEUTRAL_VALUES)
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    stream_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionRequest":
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not any(value == allowed and type(value) is type(allowed) for allowed in neutral):
                raise ValueError(f"{name}: not supported by this Best-of-N server; omit it or send {neutral[-1]!r}")
        if self.stream:
            raise ValueError(
                "stream: streaming is not supported: the Best-of-N answer is chosen after all N candidates are complete; "
                "send stream=false"
            )
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens: max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def new_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (OpenAI's newer and older name)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ScoreRequest(_Strict):
    """``POST /v1/score`` body: a prompt (one user turn) and the candidate responses to rank.

    ``response_ids`` (optional): the exact token ids of each response (e.g. from a chat
    completion's ``dabon.token_ids``); when given they are scored instead of tokenizing the text.
    ``id``: echoed in the output row, as in ``dabon score``.
    """

    prompt: str = Field(min_length=1)
    responses: list[str] = Field(min_length=1)
    response_ids: list[list[int]] | None = None
    id: str | int | None = None

    @field_validator("id")
    @classmethod
    def _id_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a string or an integer")
        return value

    @model_validator(mode="after")
    def _ids_match(self) -> "ScoreRequest":
        if self.response_ids is not None and len(self.response_ids) != len(self.responses):
            raise ValueError(
                f"response_ids: {len(self.response_ids)} id lists for {len(self.responses)} responses; give one per response"
            )
        return self
