"""Lightweight DreamBooth (LiDB): rank-r residuals through frozen random orthonormal aux.

For a dense layer with kernel `K [in, out]` (Flax: `y = x @ K`):

    dW = D_aux @ D_train @ U_train @ U_aux
    D_aux   [in, a]   frozen, orthonormal columns     D_train [a, r]  trained
    U_aux   [b, out]  frozen, orthonormal rows        U_train [r, b]  trained

(`a`, `b` clamp to the layer size on tiny models.) The aux matrices are never stored:
they are regenerated from `(seed, component/layer path)`, so a LiDB file holds only the
train values (26,400 for SD1.5 at a=100, b=50, r=1) plus the spec.

Pytrees (component -> layer path -> arrays):
    train: {"unet": {"down_blocks_0/.../attn1/to_q": {"D_train": [a, r], "U_train": [r, b]}}}
    aux:   {"unet": {"down_blocks_0/.../attn1/to_q": {"D_aux": [in, a], "U_aux": [b, out]}}}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import params as params_lib

# Default targets (regex over layer paths without '/kernel'): every UNet self- and
# cross-attention projection, and the CLIP text encoder's attention projections.
DEFAULT_TARGETS = {
    "unet": r"/attn[12]/(to_q|to_k|to_v|to_out_0)$",
    "text_encoder": r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$",
}
FILE_FORMAT = "hdb-lidb"
FILE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class LiDBSpec:
  """Everything that fixes the shapes and the aux matrices of a LiDB residual."""
  seed: int
  a: int
  b: int
  rank: int
  targets: Mapping[str, str]
  layers: Mapping[str, Mapping[str, tuple[int, int]]]  # component -> path -> (in, out)

  def dims(self, in_dim: int, out_dim: int) -> tuple[int, int]:
    """(a, b) for one layer: clamped to the layer size."""
    return min(self.a, in_dim), min(self.b, out_dim)

  @property
  def num_layers(self) -> int:
    return sum(len(v) for v in self.layers.values())

  @property
  def num_trainable(self) -> int:
    total = 0
    for layers in self.layers.values():
      for in_dim, out_dim in layers.values():
        a, b = self.dims(in_dim, out_dim)
        total += self.rank * (a + b)
    return total


def make_spec(params: Mapping[str, Mapping], *, seed: int = 0, a: int = 100, b: int = 50,
              rank: int = 1, targets: Mapping[str, str] | None = None) -> LiDBSpec:
  """Find target layers in `params` (arrays or ShapeDtypeStructs) and fix the spec."""
  targets = dict(DEFAULT_TARGETS if targets is None else targets)
  layers = {}
  for component, pattern in sorted(targets.items()):
    if component not in params:
      raise ValueError(f"LiDB target component {component!r} not in params {sorted(params)}")
    found = params_lib.find_kernels(params[component], pattern)
    if not found:
      raise ValueError(f"LiDB target regex {pattern!r} matches no dense layer of {component}")
    layers[component] = found
  return LiDBSpec(seed=int(seed), a=int(a), b=int(b), rank=int(rank), targets=targets,
                  layers=layers)


def _orthonormal_columns(key, rows: int, cols: int) -> np.ndarray:
  """[rows, cols] with orthonormal columns, reproducible bit for bit.

  The Gaussian draw is JAX's counter-based PRNG on the CPU backend (platform
  independent bits); QR runs in float64 NumPy and the signs are fixed so that R has a
  positive diagonal (QR is otherwise unique only up to signs).
  """
  with jax.default_device(jax.local_devices(backend="cpu")[0]):  # local: multi-host safe
    gaussian = np.asarray(jax.random.normal(key, (rows, cols), jnp.float32), np.float64)
  q, r = np.linalg.qr(gaussian)
  signs = np.where(np.diag(r) < 0, -1.0, 1.0)
  return (q * signs[None, :]).astype(np.float32)


def layer_aux(seed: int, component: str, layer: str, in_dim: int, out_dim: int,
              a: int, b: int) -> dict[str, np.ndarray]:
  """Aux matrices of one layer: {"D_aux": [in, a], "U_aux": [b, out]}."""
  key = jax.random.key(seed, impl="threefry2x32")
  key = jax.random.fold_in(key, params_lib.stable_hash32(f"{component}/{layer}"))
  down_key, up_key = jax.random.split(key)
  return {"D_aux": _orthonormal_columns(down_key, in_dim, a),          # [in, a]
          "U_aux": _orthonormal_columns(up_key, out_dim, b).T.copy()}  # [b, out]


def make_aux(spec: LiDBSpec) -> dict:
  """Aux pytree for every layer of `spec` (host NumPy arrays; pass them to jit as args)."""
  aux = {}
  for component, layers in spec.layers.items():
    aux[component] = {}
    for layer, (in_dim, out_dim) in layers.items():
      a, b = spec.dims(in_dim, out_dim)
      aux[component][layer] = layer_aux(spec.seed, component, layer, in_dim, out_dim, a, b)
  return aux


def init(spec: LiDBSpec, rng) -> dict:
  """Train pytree: D_train ~ N(0, 1/a) (unit-norm columns of D), U_train = 0 (dW = 0)."""
  train = {}
  for component, layers in spec.layers.items():
    train[component] = {}
    for layer, (in_dim, out_dim) in layers.items():
      a, b = spec.dims(in_dim, out_dim)
      layer_rng = jax.random.fold_in(rng, params_lib.stable_hash32(f"{component}/{layer}"))
      train[component][layer] = {
          "D_train": jax.random.normal(layer_rng, (a, spec.rank), jnp.float32) / np.sqrt(a),
          "U_train": jnp.zeros((spec.rank, b), jnp.float32),
      }
  return train


def factors(train: Mapping, aux: Mapping) -> dict:
  """LoRA factors per layer: {"down": D_aux @ D_train [in, r], "up": U_train @ U_aux [r, out]}."""
  return {
      component: {
          layer: {"down": aux[component][layer]["D_aux"] @ w["D_train"],
                  "up": w["U_train"] @ aux[component][layer]["U_aux"]}
          for layer, w in layers.items()}
      for component, layers in train.items()}


def deltas(train: Mapping, aux: Mapping) -> dict:
  """Dense residuals {component: {layer: dW [in, out]}}."""
  return {component: {layer: f["down"] @ f["up"] for layer, f in layers.items()}
          for component, layers in factors(train, aux).items()}


def scale_residuals(train: Mapping, factor: float) -> dict:
  """The LiDB weights whose every residual is `factor` times `train`'s (U_train scaled)."""
  return {c: {layer: {"D_train": w["D_train"], "U_train": factor * w["U_train"]}
              for layer, w in layers.items()}
          for c, layers in train.items()}


def merge(frozen: Mapping[str, Mapping], train: Mapping, aux: Mapping,
          scale: float = 1.0) -> dict:
  """Params with every target kernel replaced by `K + scale * dW`. Pure, jittable.

  Components without residuals are passed through unchanged (not copied).
  """
  merged = dict(frozen)
  for component, layer_deltas in deltas(train, aux).items():
    merged[component] = params_lib.add_to_kernels(
        frozen[component], {k: scale * v for k, v in layer_deltas.items()})
  return merged


# ------------------------------------------------------------------------------------
# Files: safetensors with the train values and the spec in the metadata.

def _spec_metadata(spec: LiDBSpec) -> dict[str, str]:
  return {"format": FILE_FORMAT, "version": FILE_VERSION, "seed": str(spec.seed),
          "a": str(spec.a), "b": str(spec.b), "rank": str(spec.rank),
          "targets": params_lib.to_json(dict(spec.targets)),
          "layers": params_lib.to_json({c: {k: list(v) for k, v in ls.items()}
                                        for c, ls in spec.layers.items()})}


@dataclasses.dataclass(frozen=True)
class Weights:
  """What a LiDB file holds: train values {component: {layer: {"D_train" [a, r],
  "U_train" [r, b]}}} of `spec` (whose rank is r), and the aux matrices when they are
  learned (None: the spec's seed makes them)."""
  train: Mapping
  spec: LiDBSpec
  aux: Mapping | None = None

  def save(self, path: str, base_fingerprint: str = "",
           extra_metadata: Mapping[str, str] | None = None) -> None:
    save(path, self.train, self.spec, base_fingerprint, extra_metadata, self.aux)


def save(path: str, train: Mapping, spec: LiDBSpec, base_fingerprint: str = "",
         extra_metadata: Mapping[str, str] | None = None, aux: Mapping | None = None) -> None:
  """Write a LiDB file atomically. Keys: "<component>/<layer path>/<D_train|U_train>".

  `aux`: learned aux matrices (a hypernetwork trained with learnable aux), stored as
  "<component>/<layer path>/<D_aux|U_aux>" with metadata aux="stored"; without it the
  aux matrices are regenerated from the spec's seed when the file is read.
  """
  import safetensors.numpy
  from hdb_jax import files
  tensors = {f"{component}/{layer}/{name}": np.asarray(value, np.float32)
             for tree in ([train] if aux is None else [train, aux])
             for component, layers in tree.items()
             for layer, w in layers.items() for name, value in w.items()}
  metadata = _spec_metadata(spec)
  metadata["base_fingerprint"] = base_fingerprint
  metadata["aux"] = "seed" if aux is None else "stored"
  metadata.update(extra_metadata or {})
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)


def load(path: str) -> tuple[dict, LiDBSpec, dict[str, str]]:
  """Read a LiDB file -> (train pytree of NumPy arrays, spec, metadata). Checks it fully.
  A file with stored (learned) aux matrices is refused: read it with `load_with_aux`."""
  train, aux, spec, metadata = load_with_aux(path)
  if metadata.get("aux") == "stored":
    raise ValueError(f"{path}: stores learned aux matrices; read it with "
                     "lidb.load_with_aux (the seed does not give them)")
  return train, spec, metadata


def load_with_aux(path: str) -> tuple[dict, dict, LiDBSpec, dict[str, str]]:
  """Read a LiDB file -> (train, aux, spec, metadata): the stored aux matrices, or those
  of the spec's seed. Checks shapes, finiteness and that no tensor is left over."""
  import safetensors
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such LiDB file")
  except Exception as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  if metadata.get("format") != FILE_FORMAT:
    raise ValueError(f"{path}: not a LiDB file (metadata format={metadata.get('format')!r})")
  try:
    layers = {c: {k: tuple(v) for k, v in ls.items()}
              for c, ls in json.loads(metadata["layers"]).items()}
    spec = LiDBSpec(seed=int(metadata["seed"]), a=int(metadata["a"]), b=int(metadata["b"]),
                    rank=int(metadata["rank"]), targets=json.loads(metadata["targets"]),
                    layers=layers)
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: LiDB metadata incomplete or malformed ({e})") from e
  stored_aux = metadata.get("aux", "seed")
  if stored_aux not in ("seed", "stored"):
    raise ValueError(f"{path}: metadata aux={stored_aux!r}, expected 'seed' or 'stored'")
  train, aux = {}, {}
  for component, component_layers in spec.layers.items():
    train[component], aux[component] = {}, {}
    for layer, (in_dim, out_dim) in component_layers.items():
      a, b = spec.dims(in_dim, out_dim)
      want = {"D_train": (a, spec.rank), "U_train": (spec.rank, b)}
      if stored_aux == "stored":
        want.update({"D_aux": (in_dim, a), "U_aux": (b, out_dim)})
      train[component][layer], aux[component][layer] = {}, {}
      for name, shape in want.items():
        key = f"{component}/{layer}/{name}"
        if key not in tensors:
          raise ValueError(f"{path}: tensor {key!r} missing")
        value = tensors.pop(key)
        if value.shape != shape:
          raise ValueError(f"{path}: tensor {key!r} has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
          raise ValueError(f"{path}: tensor {key!r} has NaN or Inf values")
        (train if name.endswith("_train") else aux)[component][layer][name] = value
  if tensors:
    raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:3]}")
  return train, (aux if stored_aux == "stored" else make_aux(spec)), spec, metadata


def check_base(spec: LiDBSpec, params: Mapping[str, Mapping], where: str = "") -> None:
  """Raise if the spec's layers are not in `params` with the same shapes."""
  for component, layers in spec.layers.items():
    if component not in params:
      raise ValueError(f"{where}: LiDB component {component!r} not in the base model")
    found = params_lib.find_kernels(params[component], ".*")
    for layer, shape in layers.items():
      if found.get(layer) != tuple(shape):
        raise ValueError(f"{where}: LiDB layer {component}/{layer} {tuple(shape)} does not "
                         f"fit the base model ({found.get(layer)})")
