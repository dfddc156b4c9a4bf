"""The weights dataset: pre-optimized LiDB weights of many identities, keyed by identity.

Layout of a dataset folder (written by train/preoptimize.py):

    shard-p00000-00000000-00000064.safetensors   one per process and flush, never shared
    ...
    index.json                                   written last: the dataset is complete

Each shard is a safetensors file with stacked rows, one per identity:

    identity                          int64   [n]
    train_loss, eval_loss_before, eval_loss_after   float32 [n]   (eval_* when evaluated)
    <component>/<layer>/D_train       float32 [n, a, r]
    <component>/<layer>/U_train       float32 [n, r, b]

and the LiDB spec (seed, a, b, rank, targets, layers) in its metadata, so a row is a
complete LiDB residual: `lidb.save(path, dataset.get(identity), dataset.spec)` exports
one. Why safetensors shards + a JSON index rather than array_record or orbax: the
hypernetwork trainer needs every row in memory as one array per layer (15K x 26,400
floats = 1.6 GB for SD1.5) and random access by identity; safetensors files are
memory-mapped NumPy reads with no TensorFlow, JAX or tensorstore involved, the key names
match single LiDB files, and per-process shard names make multi-host writes collision
free. array_record would add per-record serialization of what is a table of fixed-size
float arrays; orbax is a checkpoint format (whole-tree restores), not a dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Mapping

import numpy as np

from hdb_jax import files, lidb

FORMAT = "hdb-lidb-weights"
VERSION = "1"
INDEX = "index.json"
STATS = ("train_loss", "eval_loss_before", "eval_loss_after")
_SHARD = re.compile(r"^shard-p(\d{5})-(\d{8})-(\d{8})\.safetensors$")


def spec_to_json(spec: lidb.LiDBSpec) -> str:
  return json.dumps({"seed": spec.seed, "a": spec.a, "b": spec.b, "rank": spec.rank,
                     "targets": dict(spec.targets),
                     "layers": {c: {k: list(v) for k, v in ls.items()}
                                for c, ls in spec.layers.items()}}, sort_keys=True)


def spec_from_json(text: str, where: str) -> lidb.LiDBSpec:
  try:
    d = json.loads(text)
    return lidb.LiDBSpec(seed=int(d["seed"]), a=int(d["a"]), b=int(d["b"]),
                         rank=int(d["rank"]), targets=dict(d["targets"]),
                         layers={c: {k: tuple(v) for k, v in ls.items()}
                                 for c, ls in d["layers"].items()})
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: LiDB spec missing or malformed ({e})") from e


def shard_name(process_index: int, first_position: int, stop_position: int) -> str:
  """Shard of one process covering identity positions [first, stop) of the run."""
  return f"shard-p{process_index:05d}-{first_position:08d}-{stop_position:08d}.safetensors"


def list_shards(folder: str) -> list[tuple[str, int, int, int]]:
  """[(file name, process, first position, stop position)] sorted by position."""
  found = []
  for path in glob.glob(os.path.join(folder, "shard-*.safetensors")):
    match = _SHARD.match(os.path.basename(path))
    if match:
      found.append((os.path.basename(path),) + tuple(int(g) for g in match.groups()))
  return sorted(found, key=lambda s: (s[2], s[1]))


def write_shard(folder: str, name: str, identities: np.ndarray, train: Mapping,
                stats: Mapping[str, np.ndarray], spec: lidb.LiDBSpec,
                metadata: Mapping[str, str] | None = None) -> str:
  """Write stacked rows atomically. train: LiDB train pytree with leading axis [n]."""
  import safetensors.numpy
  identities = np.asarray(identities, np.int64)
  tensors = {"identity": identities}
  for key, value in stats.items():
    tensors[key] = np.asarray(value, np.float32).reshape(len(identities))
  for component, layers in train.items():
    for layer, weights in layers.items():
      for param, value in weights.items():
        value = np.asarray(value, np.float32)
        if value.shape[0] != len(identities):
          raise ValueError(f"{name}: {component}/{layer}/{param} has {value.shape[0]} rows "
                           f"for {len(identities)} identities")
        tensors[f"{component}/{layer}/{param}"] = value
  info = {"format": FORMAT, "version": VERSION, "spec": spec_to_json(spec)}
  info.update(metadata or {})
  # safetensors writes a strided view's underlying buffer: make every tensor contiguous.
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  path = os.path.join(folder, name)
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=info)
  return path


def remove_shards_from(folder: str, first_position: int) -> list[str]:
  """Delete shards that start at or after `first_position` (left by a killed run that
  will recompute them). Returns the removed names."""
  removed = []
  for name, _, first, _ in list_shards(folder):
    if first >= first_position:
      os.remove(os.path.join(folder, name))
      removed.append(name)
  return removed


def _read_shard(path: str, keys=None) -> tuple[dict, dict]:
  import safetensors
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}
  except Exception as e:
    raise ValueError(f"{path}: not a readable weights shard ({e})") from e
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path}: not a weights shard (metadata format={metadata.get('format')!r})")
  return tensors, metadata


def finalize(folder: str, expected_identities: np.ndarray,
             metadata: Mapping[str, str] | None = None) -> dict:
  """Check the shards hold every expected identity exactly once, with one spec; write
  index.json atomically (the dataset is complete once it exists). Returns the index."""
  shards = list_shards(folder)
  if not shards:
    raise ValueError(f"{folder}: no weight shards")
  entries, seen, spec_text = [], {}, None
  for name, process, first, stop in shards:
    tensors, shard_meta = _read_shard(os.path.join(folder, name), keys={"identity"})
    if spec_text is None:
      spec_text = shard_meta["spec"]
    elif shard_meta["spec"] != spec_text:
      raise ValueError(f"{os.path.join(folder, name)}: LiDB spec differs from other shards")
    for identity in tensors["identity"].tolist():
      if identity in seen:
        raise ValueError(f"{folder}: identity {identity} in {seen[identity]} and {name}")
      seen[identity] = name
    entries.append({"file": name, "process": process, "first_position": first,
                    "stop_position": stop, "count": len(tensors["identity"])})
  expected = set(np.asarray(expected_identities).tolist())
  missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
  if missing or extra:
    raise ValueError(f"{folder}: shards miss {len(missing)} identities (e.g. {missing[:3]}) "
                     f"and hold {len(extra)} unexpected ones (e.g. {extra[:3]})")
  index = {"format": FORMAT, "version": VERSION, "num_identities": len(seen),
           "spec": json.loads(spec_text), "shards": entries, "metadata": dict(metadata or {})}
  with files.atomic_path(os.path.join(folder, INDEX)) as tmp, open(tmp, "w") as f:
    json.dump(index, f, indent=1, sort_keys=True)
  return index


@dataclasses.dataclass(frozen=True)
class WeightsDataset:
  """A complete weights dataset, read into memory (NumPy). Rows sorted by identity."""
  folder: str
  spec: lidb.LiDBSpec
  metadata: dict
  identities: np.ndarray        # [N] int64, ascending
  train: dict                   # LiDB train pytree, leaves [N, ...]
  stats: dict                   # {"train_loss": [N], ...}

  def __len__(self) -> int:
    return len(self.identities)

  def row(self, identity: int) -> int:
    i = int(np.searchsorted(self.identities, identity))
    if i >= len(self.identities) or self.identities[i] != identity:
      raise KeyError(f"{self.folder}: no weights for identity {identity}")
    return i

  def get(self, identity: int) -> dict:
    """LiDB train pytree of one identity (leaves [a, r], [r, b])."""
    i = self.row(identity)
    return {c: {l: {k: v[i] for k, v in w.items()} for l, w in ls.items()}
            for c, ls in self.train.items()}


def open_dataset(folder: str) -> WeightsDataset:
  """Read a finished dataset (index.json + shards) -> WeightsDataset. Checks it fully."""
  index_path = os.path.join(folder, INDEX)
  if not os.path.exists(index_path):
    raise FileNotFoundError(f"{index_path}: missing: not a weights dataset, or its "
                            "pre-optimization run has not finished (rerun it to continue)")
  try:
    with open(index_path) as f:
      index = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{index_path}: not readable JSON ({e})") from e
  if index.get("format") != FORMAT:
    raise ValueError(f"{index_path}: not a weights dataset index (format={index.get('format')!r})")
  spec = spec_from_json(json.dumps(index.get("spec")), index_path)
  parts = []
  for entry in index["shards"]:
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: shard listed in {index_path} is missing")
    tensors, _ = _read_shard(path)
    if len(tensors["identity"]) != entry["count"]:
      raise ValueError(f"{path}: {len(tensors['identity'])} rows, index says {entry['count']}")
    parts.append(tensors)
  merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(merged["identity"], kind="stable")
  merged = {k: v[order] for k, v in merged.items()}
  train = {}
  for component, layers in spec.layers.items():
    train[component] = {}
    for layer, (in_dim, out_dim) in layers.items():
      a, b = spec.dims(in_dim, out_dim)
      want = {"D_train": (a, spec.rank), "U_train": (spec.rank, b)}
      train[component][layer] = {}
      for param, shape in want.items():
        key = f"{component}/{layer}/{param}"
        if key not in merged or merged[key].shape[1:] != shape:
          raise ValueError(f"{folder}: tensor {key!r} missing or not [N, {shape}]")
        if not np.all(np.isfinite(merged[key])):
          raise ValueError(f"{folder}: tensor {key!r} has NaN or Inf values")
        train[component][layer][param] = merged[key]
  stats = {k: merged[k] for k in STATS if k in merged}
  return WeightsDataset(os.path.abspath(folder), spec, index.get("metadata", {}),
                        merged["identity"], train, stats)


def write_mean(out: str, folders: list[str]) -> dict:
  """The mean of several weights datasets of the same identities, spec and base (the same
  pre-optimization with other training noise: `preopt.seed` varied, `preopt.init_seed`
  fixed, so every run starts from the same D_train and the factors stay comparable) ->
  a new dataset in `out`, one shard. Averages the train factors D_train and U_train
  leaf by leaf, as the hypernetwork's weight-space loss sees them, and the stats.
  Returns the index."""
  if len(folders) < 2:
    raise ValueError("averaging needs two or more weights datasets")
  if os.path.exists(os.path.join(out, INDEX)):
    raise FileExistsError(f"{os.path.join(out, INDEX)}: exists; not overwriting a dataset")
  runs = [open_dataset(folder) for folder in folders]
  first = runs[0]
  for run in runs[1:]:
    where = f"{run.folder} against {first.folder}"
    if spec_to_json(run.spec) != spec_to_json(first.spec):
      raise ValueError(f"{where}: the LiDB specs differ (seed, sizes or layers)")
    if not np.array_equal(run.identities, first.identities):
      raise ValueError(f"{where}: the identities differ")
    fingerprints = {r.metadata.get("base_fingerprint") for r in (first, run)}
    if len(fingerprints) > 1:
      raise ValueError(f"{where}: pre-optimized on other bases ({sorted(map(str, fingerprints))})")
  mean = lambda leaves: np.mean(np.stack(leaves), axis=0)
  train = {c: {l: {k: mean([r.train[c][l][k] for r in runs]) for k in weights}
               for l, weights in layers.items()} for c, layers in first.train.items()}
  stats = {k: mean([r.stats[k] for r in runs]) for k in first.stats
           if all(k in r.stats for r in runs)}
  metadata = {k: str(v) for k, v in first.metadata.items()}
  metadata["mean_of"] = json.dumps([os.path.basename(os.path.dirname(os.path.abspath(f)))
                                    + "/" + os.path.basename(os.path.abspath(f))
                                    for f in folders])
  metadata["seed"] = ",".join(str(r.metadata.get("seed", "?")) for r in runs)
  os.makedirs(out, exist_ok=True)
  name = shard_name(0, 0, len(first.identities))
  write_shard(out, name, first.identities, train, stats, first.spec, metadata)
  return finalize(out, first.identities, metadata)
