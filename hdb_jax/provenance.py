"""What made a trained artefact: `provenance.json` beside it.

    record = provenance.record(config, steps=5000, data=provenance.data_record(
        source="synthetic_faces default:train", identities=ids, arrays=[photos]),
        repo=REPO)
    provenance.write(folder, record)             # folder/provenance.json, atomic

A record holds the full resolved config (machine paths made repository-relative), the
command, the data (which identities, as ranges, and a fingerprint of what was read), the
steps, and the code: the git commit of the repository the run came from and whether its
tracked files differed from that commit (`dirty`; None where git or the repository is
missing). The training entry points (train/*.py) write one beside every artefact.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from typing import Iterable, Sequence

import numpy as np

FILE = "provenance.json"
FORMAT = "hdb-provenance"


def code_state(repo: str) -> dict:
  """{"commit": HEAD's sha or None, "dirty": tracked files changed since it, or None}."""
  def git(*args):
    done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() if done.returncode == 0 else None
  try:
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
  except (OSError, subprocess.SubprocessError):
    commit = status = None
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def identity_ranges(identities: Iterable[int]) -> list[list[int]]:
  """Identities -> [[first, stop), ...] runs of consecutive ids, in the order given."""
  ranges: list[list[int]] = []
  for identity in (int(i) for i in identities):
    if ranges and identity == ranges[-1][1]:
      ranges[-1][1] = identity + 1
    else:
      ranges.append([identity, identity + 1])
  return ranges


def fingerprint(arrays: Iterable, texts: Sequence[str] = ()) -> str:
  """sha256 (16 hex digits) of arrays (dtype, shape and bytes, in order; an iterator is
  read once, so large data can come in blocks) and texts."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  for text in texts:
    digest.update(text.encode() + b"\0")
  return digest.hexdigest()[:16]


def data_record(source: str, identities=None, arrays: Iterable = (),
                texts: Sequence[str] = (), **more) -> dict:
  """The data of a run: its source, the identities used (ranges, count) and a fingerprint
  of the arrays and texts it read (the identity ids included)."""
  out = {"source": source}
  ids = [] if identities is None else [int(i) for i in identities]
  if identities is not None:
    out["identities"] = identity_ranges(ids)
    out["num_identities"] = len(ids)
  out["fingerprint"] = fingerprint(itertools.chain([np.asarray(ids, np.int64)], arrays), texts)
  out.update(more)
  return out


def _portable(value, repo: str):
  from hdb_jax import files
  if isinstance(value, dict):
    return {k: _portable(v, repo) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_portable(v, repo) for v in value]
  if isinstance(value, str) and os.path.isabs(value):
    return files.portable_path(value, repo)
  return value


def record(config, *, steps, data: dict, repo: str, argv=None, **more) -> dict:
  """The provenance of an artefact made by this process: config (a ConfigDict or dict,
  fully resolved), the command, data, steps (a count, or one per phase) and the code
  state."""
  from hdb_jax import files
  resolved = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  argv = sys.argv if argv is None else argv
  module = os.path.relpath(os.path.abspath(argv[0]), repo) if argv else ""
  if module.endswith(".py") and not module.startswith(".."):
    module = "python -m " + module[:-3].replace(os.sep, ".")
  return {"format": FORMAT, "version": "1",
          "command": (module + " " + files.portable_command(argv[1:], repo)).strip(),
          "config": _portable(resolved, repo), "data": _portable(data, repo),
          "steps": steps, "code": code_state(repo), **more}


def write(folder: str, provenance: dict) -> str:
  """folder/provenance.json (strict JSON, atomic) -> its path."""
  from hdb_jax import files
  path = os.path.join(folder, FILE)
  files.write_json(path, provenance)
  return path
