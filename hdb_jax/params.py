"""Small pure helpers over parameter pytrees: '/'-joined paths, counts, fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping

import jax
import numpy as np

SEP = "/"


# flatten / unflatten are flax.traverse_util's flatten_dict / unflatten_dict with `sep`,
# written out here: importing flax costs ~0.2 s of every process, and a warm
# `hdb personalize` (stored programs) needs nothing else from it.
def flatten(tree: Mapping) -> dict:
  """Nested dict -> {"a/b/kernel": leaf} (empty dicts dropped, as flax does)."""
  flat = {}

  def walk(prefix: str, node: Mapping) -> None:
    for key, value in node.items():
      path = f"{prefix}{SEP}{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        walk(path, value)
      else:
        flat[path] = value
  walk("", tree)
  return flat


def unflatten(flat: Mapping) -> dict:
  """{"a/b/kernel": leaf} -> nested dict."""
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def count(tree) -> int:
  """Number of scalar values in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def find_kernels(component_params: Mapping, pattern: str) -> dict[str, tuple[int, int]]:
  """Dense layers whose path (without '/kernel') matches `pattern` -> (in, out)."""
  regex = re.compile(pattern)
  found = {}
  for path, leaf in flatten(component_params).items():
    if not path.endswith(SEP + "kernel") or len(leaf.shape) != 2:
      continue
    layer = path[: -len(SEP + "kernel")]
    if regex.search(layer):
      found[layer] = tuple(int(d) for d in leaf.shape)
  return dict(sorted(found.items()))


def add_to_kernels(component_params: Mapping, deltas: Mapping[str, jax.Array]) -> dict:
  """Return params with `kernel += delta` for each `{layer path: delta [in, out]}`.

  Pure and jittable; untouched leaves are shared with the input, not copied.
  """
  flat = flatten(component_params)
  for layer, delta in deltas.items():
    key = layer + SEP + "kernel"
    if key not in flat:
      raise KeyError(f"no kernel at {key!r}")
    flat[key] = flat[key] + delta.astype(flat[key].dtype)
  return unflatten(flat)


def fingerprint(params: Mapping[str, Mapping], layers: Mapping[str, Mapping] | None = None) -> str:
  """Short hash of a base model: every path and shape, plus values of sampled kernels.

  Cheap for SD1.5 (it reads 64 values per sampled kernel), and two different bases with
  the same architecture get different fingerprints. `layers` ({component: {path: ...}})
  chooses the kernels whose values are hashed; default: none (structure only).
  """
  h = hashlib.sha256()
  for component in sorted(params):
    for path, leaf in sorted(flatten(params[component]).items()):
      h.update(f"{component}/{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
  for component in sorted(layers or {}):
    flat = flatten(params[component])
    for layer in sorted(layers[component]):
      values = np.asarray(flat[layer + SEP + "kernel"]).reshape(-1)[:64].astype(np.float32)
      h.update(values.tobytes())
  return h.hexdigest()[:16]


def stable_hash32(text: str) -> int:
  """A 31-bit integer from a string, identical in every process (unlike `hash()`)."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def to_json(obj) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"))
