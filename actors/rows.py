"""Rows as Ray Data hands them out -> plain Python values."""

from __future__ import annotations

from typing import Any


def to_plain(value: Any) -> Any:
    """numpy arrays and scalars (Ray Data batches, pandas cells) -> plain Python lists, dicts and scalars.

    Columns of lists come back from Ray Data as numpy (object) arrays; our plain classes and
    Parquet writers take Python lists.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
