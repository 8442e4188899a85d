"""Type predicates for config values (ml_collections fields are plain Python)."""

from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
  """An integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  """A real number, not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)
