"""Prompt token ids for untrusted chat messages: message text can never become a control token.

``actors.chat.prompt_token_ids`` renders the chat template to text and tokenizes the whole text,
so a user message containing ``<|im_end|>\\n<|im_start|>system`` would be parsed into real
turn delimiters (a forged system turn). ``safe_prompt_ids`` keeps the project's encoding
where that cannot happen and closes the hole where it can:

- messages without any special-token string are encoded by ``prompt_token_ids`` itself, so the
  ids are exactly those that ``dabon score`` and the evaluation pipeline build for the same
  prompt;
- otherwise the template is rendered with a unique placeholder per message, the template's own
  text is tokenized normally (its special tokens stay control tokens), and each message's
  content is tokenized with ``split_special_tokens=True`` (its special-token strings become
  ordinary text tokens). A template that alters message content (so placeholders and real
  content render differently) is refused rather than guessed at.

The sampler and the scorer get these ids, never the text, so both see the same tokens.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Sequence

from actors.chat import chat_messages, prompt_token_ids


class UnsafePromptError(ValueError):
    """Control-token text in a message that this chat template cannot encode safely."""


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer parses into special tokens (its named and added special tokens)."""
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


def safe_prompt_ids(
    tokenizer: Any,
    messages: list[dict[str, str]],
    system_prompt: str | None = None,
    response_prefix: str | None = None,
) -> list[int]:
    """Prompt ids of chat ``messages`` (roles and string contents) where message content is text only.

    ``system_prompt`` is added first unless the messages start with a system message;
    ``response_prefix`` (trusted config text, e.g. ``<think>``) follows the generation prompt.
    Raises ``UnsafePromptError`` for a template that alters content containing special tokens.
    """
    messages = chat_messages(messages, system_prompt)
    specials = special_token_strings(tokenizer)
    if not any(has_control_text(message["content"], specials) for message in messages):
        return prompt_token_ids(tokenizer, messages, None, response_prefix)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    marker = f"\ue000{secrets.token_hex(8)}\ue001"  # private-use code points: no tokenizer treats them as control
    placeholders = [{**message, "content": f"{marker}{index}{marker}"} for index, message in enumerate(messages)]
    template_text = tokenizer.apply_chat_template(placeholders, add_generation_prompt=True, tokenize=False)
    real_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = re.split(f"{re.escape(marker)}(\\d+){re.escape(marker)}", template_text)
    # parts alternate: template text, message index, template text, ...
    rebuilt = "".join(part if position % 2 == 0 else messages[int(part)]["content"] for position, part in enumerate(parts))
    if rebuilt != real_text:
        raise UnsafePromptError(
            "this model's chat template changes message text, so a message that contains special-token text "
            f"({', '.join(s for s in specials if any(s in m['content'] for m in messages))}) cannot be encoded "
            "as plain text; remove that text from the message"
        )
    parts[-1] += response_prefix or ""
    ids: list[int] = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if part:
                ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
        else:
            ids.extend(text_token_ids(tokenizer, messages[int(part)]["content"]))
    return ids
