"""Logging setup for entry points: our INFO lines, library chatter only from WARNING up."""

from __future__ import annotations

import logging

# Libraries that log every internal step at INFO through absl (orbax logs ~30 lines per
# checkpoint).
_CHATTY = ("orbax", "tensorstore", "etils", "jax/_src", "tensorflow_datasets", "grain")


class _QuietLibraries(logging.Filter):
  def filter(self, record):
    if record.levelno >= logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return not any(f"/{name}" in path for name in _CHATTY)


def quiet_libraries() -> None:
  """Drop INFO/DEBUG records that come from chatty libraries (on every root handler)."""
  root = logging.getLogger()
  for handler in root.handlers:
    handler.addFilter(_QuietLibraries())
  logging.getLogger("absl").addFilter(_QuietLibraries())
