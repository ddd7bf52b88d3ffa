"""Result files other tools read (``jq``, ``JSON.parse``) must be strict JSON: Python writes a
non-finite float as ``NaN`` / ``Infinity``, which they reject. Here such a value becomes null."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts, lists, tuples) as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
