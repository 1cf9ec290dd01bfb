"""Request models and error bodies of the HTTP API (OpenAI-shaped where OpenAI defines one).

- ``ChatCompletionRequest``: ``POST /v1/chat/completions``; ``CompletionRequest``:
  ``POST /v1/completions`` (a raw prompt: text, tokenized as vLLM does, or token ids). ``n`` is
  the number of choices returned: the ``n`` best candidates by the selection rule, ranked. The
  candidate count is the request's ``dabon.candidates`` (``best_of`` on completions, as OpenAI's
  own field means), or else the server's ``sampling.n``, at least ``n``; ``max_tokens`` (or
  ``max_completion_tokens``) defaults to ``sampling.max_new_tokens``. These request fields keep
  OpenAI's names: the HTTP body is OpenAI's vocabulary, the app config dabon's. ``stream: true``
  sends the answer as Server-Sent Events once selection is done: the first token waits for all N
  candidates. vLLM's extensions ``return_token_ids``, ``continue_final_message`` and
  ``add_generation_prompt`` are accepted. OpenAI parameters this server does not implement are
  accepted only at their neutral value (``stop: null``, ``presence_penalty: 0``, ...) so that
  stock clients work; any other value, and any unknown field, is a 400 naming the field.
- ``ScoreRequest``: ``POST /dabon/v1/score`` with one row of ``dabon score`` input (prompt or
  prompt ids, responses and/or their exact token ids); the answer is that command's output row.
- ``ApiError`` / ``error_body``: every error is ``{"error": {"message", "type", "param", "code"}}``
  with the HTTP status on the exception; messages never carry a stack trace, and quote a client's
  value only cut short (``shown``).
- ``usage`` of an answer counts the tokens of all N sampled candidates (what the server
  generated), not only of the ``n`` choices returned; ``prompt_tokens`` is the prompt once.

Limits that depend on the app config (``sampling.max_n`` candidates, ``sampling.max_new_tokens_limit``
new tokens, prompt length) are checked in ``serve_app.service``; the models here hold only the
static rules.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actors.sampler import MIN_TEMPERATURE

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


ECHO_CHARS = 64


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with the full length
    named, so that an error never echoes a large input back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"


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
    that field, below the model's own location, is taken as the location.
    """
    problems: list[str] = []
    first_param = None
    for item in err.errors(include_url=False, include_context=False, include_input=False):
        message = item["msg"].removeprefix("Value error, ")
        param = _location(tuple(item["loc"]))
        match = _LEADING_FIELD.match(message)
        if match:  # a model-level rule naming its field, relative to where the model sits
            param, message = (f"{param}.{match.group(1)}" if param else match.group(1)), message[match.end():]
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
    """One chat message: a role the chat template knows and text content (string or text parts).
    Fields the chat template would not render (``name``, tool calls) are refused, not dropped."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @model_validator(mode="before")
    @classmethod
    def _unrendered_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
                if name in data:
                    raise ValueError(f"{name}: not supported: the chat template would not render it; remove it")
        return data

    def text(self) -> str:
        """The content as one string (text parts joined with newlines, as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class DabonOptions(_Strict):
    """The ``dabon`` extension object of a request.

    ``candidates``: Best-of-N candidates to sample (default: the server's ``sampling.n``, bounded
    by ``sampling.max_n``). ``return_candidates``: add a top-level ``dabon``
    object with all candidates, their latent similarity at the serving layer, the ranking and the
    selected index. ``skip_scoring``: return the candidates in sampling order, unscored
    (benchmarks; refused unless the server allows it).
    """

    candidates: int | None = Field(default=None, ge=1)
    return_candidates: bool = False
    skip_scoring: bool = False


class StreamOptions(_Strict):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields chat and text completions share."""

    model: str | None = None
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False
    dabon: DabonOptions = DabonOptions()
    # OpenAI parameters accepted at their neutral value only (NEUTRAL_VALUES)
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @field_validator("temperature")
    @classmethod
    def _no_underflow(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"{value:g} underflows the sampler; send 0 (greedy) or at least {MIN_TEMPERATURE} "
                f"(vLLM would raise it to {MIN_TEMPERATURE} without saying so)"
            )
        return value

    @model_validator(mode="after")
    def _neutral(self) -> "_GenerationRequest":
        for name, neutral in NEUTRAL_VALUES.items():
            value = getattr(self, name, None)
            if value is None:
                continue
            if not any(value == allowed and type(value) is type(allowed) for allowed in neutral):
                raise ValueError(f"{name}: not supported by this Best-of-N server; omit it or send {neutral[-1]!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    @property
    def new_tokens(self) -> int | None:
        """The requested new tokens per candidate (``None``: the server's ``sampling.max_new_tokens``)."""
        return self.max_tokens

    @property
    def candidates(self) -> int | None:
        """The requested candidate count (``None``: the server's ``sampling.n``, or the request's ``n`` if more)."""
        return self.dabon.candidates


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions`` body (see the module doc).

    ``continue_final_message`` (vLLM's extension): the last message is an assistant turn the model
    continues (it replaces the server's configured response prefix); ``add_generation_prompt``
    must then be false.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _chat_rules(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens: max_tokens and max_completion_tokens disagree; send one of them")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ValueError("add_generation_prompt: must be false with continue_final_message=true")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message: the last message must be an assistant message to continue")
        elif not self.add_generation_prompt:
            raise ValueError("add_generation_prompt: false is only supported with continue_final_message=true")
        return self

    @property
    def new_tokens(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (OpenAI's newer and older name; ``None``: the
        server's ``sampling.max_new_tokens``)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_field(self) -> str:
        """The name of the new-tokens field the request used (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` body: a raw ``prompt`` (text, tokenized with the tokenizer's
    special tokens as vLLM does; or token ids), no chat template and no response prefix.
    ``best_of``: the candidate count (OpenAI's field; same as ``dabon.candidates``; default the
    server's ``sampling.n``)."""

    prompt: str | list[int]
    best_of: int | None = Field(default=None, ge=1)
    echo: Any = None
    suffix: Any = None

    @model_validator(mode="after")
    def _completion_rules(self) -> "CompletionRequest":
        if isinstance(self.prompt, str) and not self.prompt:
            raise ValueError("prompt: expected a non-empty string or token ids")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: expected a non-empty string or token ids")
        for name, neutral in (("echo", (None, False)), ("suffix", (None, ""))):
            value = getattr(self, name)
            if value is not None and not any(value == allowed and type(value) is type(allowed) for allowed in neutral):
                raise ValueError(f"{name}: not supported by this Best-of-N server; omit it or send {neutral[-1]!r}")
        if self.best_of is not None and self.dabon.candidates is not None and self.best_of != self.dabon.candidates:
            raise ValueError("best_of: best_of and dabon.candidates disagree; send one of them")
        return self

    @property
    def candidates(self) -> int | None:
        return self.best_of if self.best_of is not None else self.dabon.candidates


class ScoreRequest(_Strict):
    """``POST /dabon/v1/score`` body: one ``dabon score`` input row (``pipelines.score``).

    ``prompt`` (one user turn, through the chat template with the server's prompt config) or
    ``prompt_ids`` (used as they are); ``responses`` (text, tokenized as plain text) and/or
    ``response_ids`` (the exact token ids, used instead of the text when given). ``id``: echoed in
    the output row.
    """

    id: str | int | None = None
    prompt: str | None = Field(default=None, min_length=1)
    prompt_ids: list[int] | None = Field(default=None, min_length=1)
    responses: list[str] | None = Field(default=None, min_length=1)
    response_ids: list[list[int]] | None = Field(default=None, min_length=1)

    @field_validator("id")
    @classmethod
    def _id_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a string or an integer")
        return value

    @model_validator(mode="after")
    def _row_rules(self) -> "ScoreRequest":
        if self.prompt is None and self.prompt_ids is None:
            raise ValueError("prompt: give prompt (text) or prompt_ids")
        if self.responses is None and self.response_ids is None:
            raise ValueError("responses: give responses (text) or response_ids")
        if self.responses is not None and self.response_ids is not None and len(self.response_ids) != len(self.responses):
            raise ValueError(
                f"response_ids: {len(self.response_ids)} id lists for {len(self.responses)} responses; give one per response"
            )
        return self

    @property
    def count(self) -> int:
        """Number of responses."""
        return len(self.response_ids if self.response_ids is not None else self.responses or [])
