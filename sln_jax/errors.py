"""Errors a user can fix: one line naming the file and the field.

``cli.run_cli`` prints a ``UserError`` as ``error: PATH: FIELD: MESSAGE`` and
exits with code 2. No heavy imports: input_pipeline and every script use it.
"""

from __future__ import annotations


class UserError(Exception):
  """An error the user can fix. ``str(err)`` names the file and the field."""

  def __init__(self, message: str, path: str = '', field: str = ''):
    parts = [p for p in (path, field) if p]
    super().__init__(': '.join(parts + [message]))
    self.path, self.field, self.message = path, field, message


def listing(title: str, items: list[str], limit: int = 40) -> str:
  """'N title: a, b, ... (+k more)': at most ``limit`` items named."""
  shown = items[:limit]
  more = f' (+{len(items) - len(shown)} more)' if items[len(shown) :] else ''
  return f'{len(items)} {title}: {", ".join(shown)}{more}'
