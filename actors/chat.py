"""Prompts and responses as token ids and text, built one way for every role.

**Prompt ids** (sampler, scorer, trainer, server): the tokenizer's own chat template over one
user turn (or the given messages) with ``add_generation_prompt=True``, the ``PromptConfig``'s
system prompt first and its response prefix (e.g. ``<think>\\n``) after the generation prompt.
Message text can never become a control token: a message holding special-token text such as
``<|im_end|>\\n<|im_start|>system`` (a forged turn, common in jailbreak prompts) is tokenized as
plain text, while the template's own special tokens stay control tokens. Messages without
special-token text are tokenized exactly as ``tokenizer(template_text)`` would. Token ids given
by the caller pass through unchanged.

**Response ids**: a response text is tokenized on its own as plain text (special-token strings
split like any text); ids pass through, so generated ids are scored exactly as generated.

**The answer rule** (judge, report, training): ``parse_response(text, response_prefix)`` puts
the prompt's response prefix back in front of the generated text and splits it into the
reasoning (inside ``<think>...</think>``) and the answer (after the first ``</think>`` that
closes it; text before ``<think>`` is shown to the user, so it belongs to the answer). A
reasoning that was opened and never closed is *unfinished*: there is no answer.

**Which prompt** (evaluation, serving): the one the adapter was trained with, saved beside it as
``prompt.yaml`` by ``dabon distill`` (``adapter_prompt``), unless the run's config gives its own
(``resolve_prompt`` says where the prompt came from and where it differs from the adapter's).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import Any, Sequence

from actors.config import PromptConfig
from actors.errors import UserError

Prompt = str | list[dict[str, str]] | list[int]
Response = str | list[int]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PROMPT_FILE = "prompt.yaml"  # the PromptConfig an adapter was trained with, saved beside it


class UnsafePromptError(UserError, ValueError):
    """Control-token text in a message that this chat template cannot encode as plain text."""


def is_token_ids(value: Any) -> bool:
    """True for a list of plain integers (token ids)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def chat_messages(prompt: str | list[dict[str, str]], system_prompt: str | None = None) -> list[dict[str, str]]:
    """One user turn (or the given messages), with ``system_prompt`` first when given and the
    messages do not start with a system message."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise TypeError(f"prompt: expected a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer parses into special tokens (its named and added special tokens), longest first."""
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content))
    return tuple(sorted((s for s in strings if s), key=len, reverse=True))


def has_control_text(text: str, specials: Sequence[str]) -> bool:
    """True when ``text`` contains any of the special-token strings."""
    return any(special in text for special in specials)


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` as plain text: special-token strings inside it are split like any text."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _template_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; pass prompts as token ids instead")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_token_ids(tokenizer: Any, prompt: Prompt, config: PromptConfig | None = None) -> list[int]:
    """Token ids of a prompt as the model sees it before its response (see module doc).

    ``prompt``: a user message, a list of chat messages, or token ids (returned as they are).
    ``config``: system prompt and response prefix (default: none of either). Raises
    ``UnsafePromptError`` for a template that alters message text holding special-token strings.
    """
    if is_token_ids(prompt):
        return list(prompt)  # type: ignore[arg-type]
    config = config or PromptConfig()
    messages = chat_messages(prompt, config.system_prompt)  # type: ignore[arg-type]
    specials = special_token_strings(tokenizer)
    if not any(has_control_text(str(message.get("content", "")), specials) for message in messages):
        text = _template_text(tokenizer, messages) + config.response_prefix
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    marker = f"\ue000{secrets.token_hex(8)}\ue001"  # private-use code points: no tokenizer treats them as control
    placeholders = [{**message, "content": f"{marker}{index}{marker}"} for index, message in enumerate(messages)]
    template_text = _template_text(tokenizer, placeholders)
    real_text = _template_text(tokenizer, messages)
    parts = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", template_text)
    # parts alternate: template text, message index, template text, ...
    rebuilt = "".join(part if position % 2 == 0 else messages[int(part)]["content"] for position, part in enumerate(parts))
    if rebuilt != real_text:
        found = ", ".join(s for s in specials if any(s in m["content"] for m in messages))
        raise UnsafePromptError(
            "this model's chat template changes message text, so a message that contains special-token text "
            f"({found}) cannot be encoded as plain text; remove that text from the message"
        )
    parts[-1] += config.response_prefix
    ids: list[int] = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if part:
                ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
        else:
            ids.extend(text_token_ids(tokenizer, messages[int(part)]["content"]))
    return ids


def response_token_ids(tokenizer: Any, response: Response) -> list[int]:
    """Token ids of a response: text as plain text (``text_token_ids``); ids pass through."""
    if isinstance(response, str):
        return text_token_ids(tokenizer, response)
    if is_token_ids(response):
        return list(response)  # type: ignore[arg-type]
    raise TypeError(f"response: expected a string or a list of token ids, got {type(response).__name__}")


# ----------------------------------------------------------------------------------------
# The answer rule
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """A response split by the answer rule: ``reasoning`` and ``answer`` (both stripped),
    ``finished`` (False when a reasoning was opened and never closed: then there is no answer),
    ``has_reasoning`` (a reasoning block was opened or closed)."""

    reasoning: str
    answer: str
    finished: bool
    has_reasoning: bool


def parse_response(text: str, response_prefix: str = "") -> ParsedResponse:
    """Split ``response_prefix + text`` into reasoning and answer (see module doc).

    - ``"<think>R</think>A"`` -> reasoning R, answer A, finished;
    - ``"R</think>A"`` (the template opened ``<think>`` itself) -> R, A, finished;
    - ``"A"`` (no reasoning block) -> "", A, finished;
    - ``"<think>R"`` (never closed) -> R, "", unfinished.
    """
    full = (response_prefix or "") + text
    close_at = full.find(THINK_CLOSE)
    open_at = full.find(THINK_OPEN)
    if open_at == -1 or (close_at != -1 and close_at < open_at):
        if close_at == -1:
            return ParsedResponse("", full.strip(), True, False)
        return ParsedResponse(full[:close_at].strip(), full[close_at + len(THINK_CLOSE):].strip(), True, True)
    preamble = full[:open_at].strip()
    rest = full[open_at + len(THINK_OPEN):]
    close_at = rest.find(THINK_CLOSE)
    if close_at == -1:
        return ParsedResponse(rest.strip(), preamble, False, True)
    answer = rest[close_at + len(THINK_CLOSE):].strip()
    return ParsedResponse(rest[:close_at].strip(), "\n".join(part for part in (preamble, answer) if part), True, True)


def full_response(text: str, response_prefix: str = "") -> str:
    """The whole response as a reader sees it: ``response_prefix + text``, stripped, with an
    opening ``<think>`` restored where only the closing tag is in the text (the template opened it)."""
    full = ((response_prefix or "") + text).strip()
    close_at = full.find(THINK_CLOSE)
    open_at = full.find(THINK_OPEN)
    if close_at != -1 and (open_at == -1 or open_at > close_at):
        full = THINK_OPEN + full
    return full


def trace_text(reasoning: str, answer: str) -> str:
    """A whole trace as the student should write it: ``<think>\\nR\\n</think>\\n\\nA``."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def completion_text(reasoning: str, answer: str, response_prefix: str = "") -> str:
    """What the student generates after its prompt: ``trace_text`` without the response prefix
    that the prompt already holds (``<think>\\n`` -> ``R\\n</think>\\n\\nA``)."""
    text = trace_text(reasoning, answer)
    if not text.startswith(response_prefix):
        raise ValueError(f"response_prefix {response_prefix!r} is not the start of a trace ({text[:20]!r}...)")
    return text[len(response_prefix):]


# ----------------------------------------------------------------------------------------
# Which prompt
# ----------------------------------------------------------------------------------------


def adapter_prompt(adapter: str | None) -> PromptConfig | None:
    """The ``PromptConfig`` saved beside an adapter (``prompt.yaml``; a local path or a storage
    URI), ``None`` when there is no adapter or no such file. A malformed file is a
    ``ConfigError`` naming it."""
    if not adapter:
        return None
    import yaml

    from actors import storage
    from actors.config import validate

    location = storage.join(adapter, PROMPT_FILE)
    if not storage.is_file(location):
        return None
    data = yaml.safe_load(storage.read_text(location)) or {}
    return validate(PromptConfig, data, location)


def prompt_differences(prompt: PromptConfig, reference: PromptConfig) -> list[str]:
    """The ``PromptConfig`` fields in which ``prompt`` differs from ``reference``."""
    return [name for name in PromptConfig.model_fields if getattr(prompt, name) != getattr(reference, name)]


def resolve_prompt(given: PromptConfig | None, adapter: str | None) -> tuple[PromptConfig, str]:
    """The prompt a run uses and where it came from.

    ``given``: the config's own prompt section, ``None`` when the config has none. Without one,
    the adapter's ``prompt.yaml`` (else no system prompt and no prefix). With one, that prompt;
    the note then names the fields where it differs from the adapter's.
    """
    trained = adapter_prompt(adapter)
    if given is None:
        if trained is None:
            return PromptConfig(), "default (no system prompt, no response prefix; the adapter saved no prompt.yaml)"
        return trained, f"the adapter's {PROMPT_FILE}"
    if trained is None:
        return given, "the config's prompt section"
    differs = prompt_differences(given, trained)
    if not differs:
        return given, f"the config's prompt section, the same as the adapter's {PROMPT_FILE}"
    return given, f"the config's prompt section, which differs from the adapter's {PROMPT_FILE} in {', '.join(differs)}"
