"""Load an ml_collections config file (`configs/*.py` with `get_config()`) by path."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of the file at `path`, with dotted-key overrides applied."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location("hdb_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: config file has no get_config()")
  config = module.get_config()
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config
