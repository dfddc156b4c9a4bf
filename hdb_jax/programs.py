"""Programs traced once per machine: `jax.export` on disk, XLA's persistent cache beside it.

JAX's persistent compilation cache skips XLA's compile in a new process, but not the
tracing and lowering of the Python functions (for the UNet, the VAE and the text encoder:
most of a warm `hdb personalize`), nor the imports those need. A `Store` keeps each program as serialized StableHLO (`jax.export`), under a key
that covers everything that shapes it: the caller's settings, the array shapes, and
`code_version()` (this package's source, the models' included, and the versions of JAX
and the libraries that build the programs). A new process deserializes the programs and compiles them, which the
persistent cache answers, without importing or tracing any model code.

    store = programs.Store(folder)
    bundle = store.load(key)                       # None: not stored (or unreadable)
    ... else: store.save(key, {"name": jax.export.export(jitted)(*args)}, meta)
    fn = programs.compiled(bundle.programs["name"])  # a compiled callable

Pytrees of optax states cross the serialization as registered named tuples
(`register_namedtuples`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time

import jax

LIBRARIES = ("jax", "jaxlib", "flax", "optax")
META_FILE = "meta.json"
SUFFIX = ".jaxexport"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """A hash of this package's Python source and the versions of the libraries whose code
  ends up in the traced programs: any change makes stored programs stale."""
  h = hashlib.sha256()
  root = os.path.dirname(os.path.abspath(__file__))
  for folder, dirs, names in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  for library in LIBRARIES:
    try:
      h.update(f"{library}={importlib.metadata.version(library)};".encode())
    except importlib.metadata.PackageNotFoundError:
      h.update(f"{library}=none;".encode())
  return h.hexdigest()[:16]


def key_of(*parts) -> str:
  """A short key for JSON-able `parts`, plus the code version and the devices."""
  devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
  text = json.dumps([code_version(), devices, parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


_REGISTERED: set[type] = set()


def register_namedtuples(tree) -> None:
  """Register every named-tuple type in `tree` (optax states) for export serialization;
  both the process that saves and the one that loads must call it."""
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    kind = type(tree)
    if kind not in _REGISTERED:
      jax.export.register_namedtuple_serialization(
          kind, serialized_name=f"{kind.__module__}.{kind.__qualname__}")
      _REGISTERED.add(kind)
  if isinstance(tree, (tuple, list)):
    for child in tree:
      register_namedtuples(child)
  elif isinstance(tree, dict):
    for child in tree.values():
      register_namedtuples(child)


@dataclasses.dataclass
class Bundle:
  programs: dict[str, jax.export.Exported]
  meta: dict


class Store:
  """Bundles of exported programs in `folder`/<key>/: one file per program + meta.json."""

  def __init__(self, folder: str):
    self.folder = os.path.expanduser(folder)

  def load(self, key: str) -> Bundle | None:
    """The bundle stored under `key`, or None (absent, partial or unreadable: a stale
    or damaged cache entry is rebuilt, never trusted)."""
    where = os.path.join(self.folder, key)
    try:
      with open(os.path.join(where, META_FILE)) as f:
        meta = json.load(f)
      stored = {}
      for name in meta["programs"]:
        with open(os.path.join(where, name + SUFFIX), "rb") as f:
          stored[name] = jax.export.deserialize(bytearray(f.read()))
      return Bundle(stored, meta)
    except FileNotFoundError:
      return None
    except Exception as e:  # a damaged entry: rebuild it
      logging.warning("%s: unreadable stored programs, rebuilding them (%s)", where, e)
      return None

  def save(self, key: str, exported: dict[str, jax.export.Exported], meta: dict) -> None:
    """Write the bundle atomically: a folder renamed into place when complete."""
    os.makedirs(self.folder, exist_ok=True)
    final = os.path.join(self.folder, key)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=self.folder)
    try:
      for name, program in exported.items():
        with open(os.path.join(tmp, name + SUFFIX), "wb") as f:
          f.write(program.serialize())
      with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(dict(meta, programs=sorted(exported)), f)
      if os.path.isdir(final):  # another process stored it meanwhile, or it was damaged
        shutil.rmtree(final, ignore_errors=True)
      os.replace(tmp, final)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


class Pending:
  """A program compiling in a background thread: calling it waits for the compiled code
  (then runs it); `ready_at` is the `time.perf_counter()` when it was ready."""

  def __init__(self, name: str, future):
    self.name, self._future = name, future  # the future gives (program, ready time)

  @property
  def ready_at(self) -> float | None:
    """None while compiling (the time is taken in the compiling thread, so a caller that
    waited for `result()` always sees it)."""
    return self._future.result()[1] if self._future.done() else None

  def result(self):
    return self._future.result()[0]

  def __call__(self, *args, **kwargs):
    return self._future.result()[0](*args, **kwargs)


class Compiler:
  """Compiles exported programs in background threads as they are submitted, so that a
  caller still tracing the next program keeps the other cores compiling the last."""

  def __init__(self, workers: int | None = None):
    from concurrent.futures import ThreadPoolExecutor
    self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                    thread_name_prefix="hdb-compile")

  def submit(self, name: str, exported: jax.export.Exported, donate_argnums=()) -> Pending:
    def compile_and_time():
      return compiled(exported, donate_argnums), time.perf_counter()
    return Pending(name, self._pool.submit(compile_and_time))

  def close(self) -> None:
    """No more programs: the threads end when their work is done."""
    self._pool.shutdown(wait=False)


def compile_all(exported: dict[str, jax.export.Exported], donate: dict[str, tuple] | None = None,
                order: tuple[str, ...] = ()) -> dict[str, Pending]:
  """`compiled` for every program, in background threads -> {name: Pending}: returns at
  once, so the caller works (reads the photo, runs the programs already built) while the
  rest compile. XLA compiles (and loads cached code) without the GIL, so programs build
  side by side on the host's cores; `order` names the ones to start first (the longest)."""
  donate = donate or {}
  names = [n for n in order if n in exported] + [n for n in exported if n not in order]
  compiler = Compiler(min(len(exported), os.cpu_count() or 1))
  pending = {name: compiler.submit(name, exported[name], donate.get(name, ()))
             for name in names}
  compiler.close()
  return pending


def compiled(exported: jax.export.Exported, donate_argnums=()):
  """The exported program compiled for this process (XLA's persistent cache answers
  when it compiled it before); called with the same pytrees it was exported with."""
  args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
  return jax.jit(exported.call, donate_argnums=donate_argnums).lower(*args, **kwargs).compile()
