"""Grading of benchmark answers (pure functions, no I/O): the final number of a GSM8K answer and
whether it matches the reference (``gsm8k_correct``), the letter an MMLU answer chose
(``extract_choice_letter``). ``pipelines.metrics`` grades utility with them; the loaders in
``pipelines.data`` produce the references they are graded against.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional minus (touching the digits, and not after a digit or word: "10-5" and "7 - 2"
# are subtraction), optional
# $, digits with optional thousands commas, optional decimals; or a bare ".5".
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<neg>-)?(?:\$\s?)?(?P<neg2>-)?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)
# Markup that states the final answer outright; the number right after the last one wins.
_FINAL_MARKER = re.compile(r"\\boxed\{|####|final answer", re.IGNORECASE)


def normalise_number(text: str | None) -> str | None:
    """A number as a canonical string: commas, ``$`` and spaces dropped, no trailing zeros.

    ``"1,234"`` -> ``"1234"``, ``"18.00"`` -> ``"18"``, ``"0.50"`` -> ``"0.5"``, ``"-0"`` -> ``"0"``;
    ``None`` when ``text`` is not a single number.
    """
    if text is None:
        return None
    cleaned = re.sub(r"[\s,$]", "", str(text)).rstrip(".")
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        negative = bool(match.group("neg")) != bool(match.group("neg2"))
        value = normalise_number(match.group("num"))
        if value is not None:
            found.append(normalise_number(f"-{value}") if negative else value)
    return found


def extract_final_number(text: str | None) -> str | None:
    """The final numeric answer in a model's response, normalised (``normalise_number``), or ``None``.

    Only the part after the last ``</think>`` counts when it holds a number. If that part states
    the answer with ``\\boxed{...}``, ``#### N`` or "final answer", the first number after the
    last such marker wins; otherwise the last number in it. Handles thousands commas, ``$``,
    negative (``-5``, ``-$5``, ``$-5``) and decimal (``3.5``, ``.5``) numbers; a minus right after
    a digit is subtraction, not a sign (``10-5`` gives 5).
    """
    if not text:
        return None
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        if _numbers(after):
            text = after
    markers = list(_FINAL_MARKER.finditer(text))
    if markers:
        numbers = _numbers(text[markers[-1].end():])
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_correct(response: str | None, reference: str) -> bool:
    """Whether the final number of ``response`` equals ``reference`` (both normalised, compared as numbers).

    Raises ``ValueError`` when ``reference`` is not a number (a data bug, not a wrong answer).
    """
    expected = normalise_number(reference)
    if expected is None:
        raise ValueError(f"GSM8K reference {reference!r} is not a number")
    answer = extract_final_number(response)
    return answer is not None and Decimal(answer) == Decimal(expected)


# "Answer: C", "the answer is (b)", "The correct option is D", "answer: **B**", "\boxed{A}".
_STATED_LETTER = re.compile(
    r"(?:\banswer\s*(?:is\s*:?|:|=)?|\b(?:option|choice)\s*(?:is\s*:?|:|=))\s*(?:\\boxed\{)?[*_]*\s*[(\[]?\s*"
    r"(?P<letter>[A-Da-d])(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# "A or B", "A, C", "B/D" right after a stated letter: a hedge, not an answer.
_HEDGE = re.compile(r"\s*[)\]]?\s*(?:,|/|\bor\b|\band\b)\s*[(\[]?\s*[A-Da-d](?![A-Za-z0-9])", re.IGNORECASE)
_BOXED_LETTER = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*(?P<letter>[A-Da-d])\s*\}")
# The whole response is a letter: "B", "(b)", "C.", "**D**".
_ONLY_LETTER = re.compile(r"\s*[*_]*[(\[]?\s*(?P<letter>[A-Da-d])\s*[)\]]?[.:]?[*_]*\s*")
# The response starts with a capital letter and punctuation: "B. 42", "(C) Paris", "A: ...".
_LEADING_LETTER = re.compile(r"\s*[*_]*(?:\((?P<p>[A-D])\)|(?P<letter>[A-D])[.:)])")
_PAREN_LETTER = re.compile(r"\((?P<letter>[A-D])\)")


def extract_choice_letter(text: str | None) -> str | None:
    """The MMLU choice (``"A"``-``"D"``) a response gives, or ``None`` when absent or ambiguous.

    Only the part after the last ``</think>`` counts when there is one. In order:
    1. statements such as "Answer: C", "The answer is (B)", "the correct option is d",
       "\\boxed{A}": one distinct letter wins; two different letters, or a hedge such as
       "A or B", are ambiguous (``None``);
       a lowercase letter followed by a word ("the answer is a bit...") is the article, not a choice;
    2. a response that is only a letter ("B", "(b)", "C.");
    3. a response that starts with a capital letter and punctuation ("B. 42", "(C) Paris");
    4. exactly one distinct parenthesised capital letter anywhere ("... so (D).").
    """
    if not text:
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    stated = set()
    for pattern in (_STATED_LETTER, _BOXED_LETTER):
        for match in pattern.finditer(text):
            letter = match.group("letter")
            if letter.islower() and re.match(r"\s+[A-Za-z]", text[match.end():]):
                continue
            if _HEDGE.match(text, match.end()):
                return None
            stated.add(letter.upper())
    if stated:
        return stated.pop() if len(stated) == 1 else None
    match = _ONLY_LETTER.fullmatch(text)
    if match:
        return match.group("letter").upper()
    match = _LEADING_LETTER.match(text)
    if match:
        return match.group("p") or match.group("letter")
    in_parens = {m.group("letter") for m in _PAREN_LETTER.finditer(text)}
    return in_parens.pop() if len(in_parens) == 1 else None
