"""Prompt and response token ids, built one way for every role (sampler, scorer, serving).

Prompt ids are the tokenizer's own chat template for one user turn (or the given messages)
with ``add_generation_prompt=True``, followed by an optional response prefix such as
``<think>``; response ids are the response text tokenized on its own with
``add_special_tokens=False``. Token ids given by the caller pass through unchanged, so
generated ids are scored exactly as generated.
"""

from __future__ import annotations

from typing import Any

Prompt = str | list[dict[str, str]] | list[int]
Response = str | list[int]


def is_token_ids(value: Any) -> bool:
    """True for a list of plain integers (token ids)."""
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def chat_messages(prompt: str | list[dict[str, str]], system_prompt: str | None = None) -> list[dict[str, str]]:
    """One user turn (or the given messages), with ``system_prompt`` first when given."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise TypeError(f"prompt: expected a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def prompt_token_ids(
    tokenizer: Any, prompt: Prompt, system_prompt: str | None = None, response_prefix: str | None = None
) -> list[int]:
    """Token ids of a prompt as the model sees it before its response (see module doc)."""
    if is_token_ids(prompt):
        return list(prompt)  # type: ignore[arg-type]
    messages = chat_messages(prompt, system_prompt)  # type: ignore[arg-type]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass prompts as token ids instead")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text += response_prefix or ""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_token_ids(tokenizer: Any, response: Response) -> list[int]:
    """Token ids of a response: text tokenized with ``add_special_tokens=False``; ids pass through."""
    if isinstance(response, str):
        return list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    if is_token_ids(response):
        return list(response)  # type: ignore[arg-type]
    raise TypeError(f"response: expected a string or a list of token ids, got {type(response).__name__}")
