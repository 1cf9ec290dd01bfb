"""The one error base that the ``dabon`` command prints as a single line.

``UserError`` marks a problem the user can fix without reading code: a bad recipe key, a
missing file, a model that cannot be found, a malformed input row. The CLI prints its message
and exits 2. Anything else is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import importlib
import re

# the last line of a remote traceback, as Ray writes it into an error message it cannot unpickle
_REMOTE_ERROR = re.compile(r"^((?:actors|pipelines|serve_app)\.[\w.]+): (.+)$", re.MULTILINE)


class UserError(Exception):
    """Bad input, config or environment; the message names the field or file and what was expected."""


def user_error_of(err: BaseException) -> UserError | None:
    """The ``UserError`` behind ``err``: itself, or the cause that a Ray task or actor raised.

    Ray re-raises a remote exception as ``RayTaskError`` (or ``RayActorError`` for a failed
    actor constructor) carrying the original in ``cause``; Ray Data wraps user code errors once
    more. The chain of causes and contexts is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError) and type(current).__module__ != "ray.exceptions":
            return current
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException) and id(cause) not in seen:
            current = cause
            continue
        current = current.__cause__ or current.__context__
    # an actor whose constructor raised dies with only the text of the error (ActorDiedError)
    for match in reversed(_REMOTE_ERROR.findall(str(err))):
        module, _, name = match[0].rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(found, type) and issubclass(found, UserError):
            return UserError(match[1].strip())
    return None
