"""Load ml_collections config files (`configs/*.py` with `get_config()`) by path."""

from __future__ import annotations

import difflib
import importlib.util
import os
import types

import ml_collections


def module(path: str) -> types.ModuleType:
  """The config file at `path` as a module (configs/ is a folder of files, not a package)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config file")
  name = "hdb_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


def sibling(config_path: str, name: str) -> types.ModuleType:
  """Config file `name`.py in the folder of `config_path` (pass `__file__`), as a module."""
  return module(os.path.join(os.path.dirname(os.path.abspath(config_path)), f"{name}.py"))


def load(path: str, overrides: dict | None = None,
         allow_download: bool = False) -> ml_collections.ConfigDict:
  """`get_config()` of the file at `path` ("file.py:arg" calls `get_config("arg")`, as
  absl's --config flag does), with dotted-key overrides applied. An override of a key the
  config does not have, or with a value of another type, is a ValueError naming it.
  Model folders given as Hugging Face repo ids are resolved from the local cache
  (`hub.resolve_config`; fetched only with `allow_download`)."""
  argument = None
  if not os.path.isfile(path) and ":" in path:
    path, argument = path.rsplit(":", 1)
  loaded = module(path)
  if not hasattr(loaded, "get_config"):
    raise ValueError(f"{path}: config file has no get_config()")
  config = loaded.get_config() if argument is None else loaded.get_config(argument)
  for key, value in (overrides or {}).items():
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = f" (did you mean {'.'.join(parts[:depth] + close)!r}?)" if close else ""
        raise ValueError(f"{path}: unknown config key {key!r}{hint}")
      if depth < len(parts) - 1:
        node = node[part]
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: config key {key!r} cannot take {value!r} ({e})") from None
  from hdb_jax import hub
  hub.resolve_config(config, allow_download)
  return config
