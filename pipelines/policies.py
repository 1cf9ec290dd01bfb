"""Safety policies per category and the teacher prompt of deliberative alignment (METHOD.md section 1).

``pipelines/policies.yaml`` holds one policy per STAR category (an objective and rules, each
calling for one action: refuse, safe-complete, redirect or comply); ``pipelines/teacher_prompt.txt``
is the teacher's user message with ``${policies}`` and ``${prompt}``. ``teacher_prompt`` fills it
with a question and the policies of its categories; an unknown category is a ``PolicyError``
(never a fallback policy). Both files ship as package data and can be replaced by a recipe
(``teacher.policies`` / ``teacher.template``).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from actors.errors import UserError

# The nine categories of METHOD.md section 1 (STAR-41K / STAR-1 names) and the policy actions.
CATEGORIES: tuple[str, ...] = (
    "Harassment / Hate / Discrimination",
    "Sexual / Adult",
    "Violence / Physical Harm",
    "Self-Harm",
    "Illicit / Criminal Behavior",
    "Misinformation / Disinformation",
    "Privacy / Personal Data",
    "Intellectual Property",
    "Benign",
)
POLICY_ACTIONS: dict[str, str] = {
    "refuse": "Refuse",
    "safe_complete": "Safe-complete",
    "redirect": "Redirect to resources",
    "comply": "Comply",
}


class PolicyError(UserError, ValueError):
    """A category without a policy, or a malformed policy or template file."""


class PolicyRule(BaseModel):
    """One rule: the ``action`` it calls for (refuse, safe_complete, redirect, comply) and when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["refuse", "safe_complete", "redirect", "comply"]
    text: str = Field(min_length=1)


class Policy(BaseModel):
    """A category's safety policy: its ``objective`` and numbered ``rules``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: str = Field(min_length=1)
    rules: list[PolicyRule] = Field(min_length=1)


class PolicySet(BaseModel):
    """The policies file: ``version`` and one ``Policy`` per category name."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    policies: dict[str, Policy] = Field(min_length=1)


def _package_text(name: str) -> str:
    return resources.files("pipelines").joinpath(name).read_text(encoding="utf-8")


def load_policies(path: str | Path | None = None) -> dict[str, Policy]:
    """Category name -> ``Policy`` from a YAML file (default: the packaged ``policies.yaml``)."""
    where = str(path) if path else "pipelines/policies.yaml (packaged)"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8") if path else _package_text("policies.yaml"))
    except (OSError, yaml.YAMLError) as err:
        raise PolicyError(f"policies file {where}: {err}") from err
    try:
        return dict(PolicySet.model_validate(data).policies)
    except ValueError as err:
        raise PolicyError(f"policies file {where}: {err}") from err


def policy_for(category: str, policies: dict[str, Policy]) -> tuple[str, Policy]:
    """(canonical name, policy) of a category; names match exactly, ignoring case and outer spaces.

    An unknown category raises ``PolicyError`` listing the known ones (never a fallback policy).
    """
    wanted = category.strip()
    if wanted in policies:
        return wanted, policies[wanted]
    for name, policy in policies.items():
        if name.lower() == wanted.lower():
            return name, policy
    raise PolicyError(f"no safety policy for category {category!r}; known categories: {', '.join(policies)}")


def render_policies(categories: Iterable[str], policies: dict[str, Policy]) -> str:
    """The policies of ``categories`` (each once, in order) as text for the teacher prompt."""
    blocks, seen = [], set()
    for category in categories:
        name, policy = policy_for(category, policies)
        if name in seen:
            continue
        seen.add(name)
        lines = [f"### Policy: {name}", f"Objective: {policy.objective.strip()}", "Rules:"]
        lines += [f"{i}. [{POLICY_ACTIONS[rule.action]}] {rule.text.strip()}" for i, rule in enumerate(policy.rules, 1)]
        blocks.append("\n".join(lines))
    if not blocks:
        raise PolicyError("a prompt without any category gets no policy; every prompt needs at least one category")
    return "\n\n".join(blocks)


def load_teacher_template(path: str | Path | None = None) -> string.Template:
    """The teacher prompt template (default: the packaged ``teacher_prompt.txt``); it must hold
    the placeholders ``${policies}`` and ``${prompt}``."""
    where = str(path) if path else "pipelines/teacher_prompt.txt (packaged)"
    try:
        text = Path(path).read_text(encoding="utf-8") if path else _package_text("teacher_prompt.txt")
    except OSError as err:
        raise PolicyError(f"teacher template {where}: {err}") from err
    template = string.Template(text)
    names = set(template.get_identifiers())
    if names != {"policies", "prompt"}:
        raise PolicyError(f"teacher template {where}: expected the placeholders ${{policies}} and ${{prompt}}, found {sorted(names)}")
    return template


def teacher_prompt(question: str, categories: Iterable[str], policies: dict[str, Policy], template: string.Template) -> str:
    """The teacher's user message: the template filled with the question and its categories' policies."""
    return template.substitute(policies=render_policies(categories, policies), prompt=question.strip())
