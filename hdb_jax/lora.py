"""Generic LoRA residuals: plain `down @ up` factors per layer, and their file.

The common currency between LiDB files, rank-relaxed finetuning and PyTorch LoRA files
(hdb_jax/convert.py). For a dense layer with Flax kernel `K [in, out]` (`y = x @ K`):

    dW = down @ up        down [in, r]   up [r, out]

exactly: any alpha / rank scale of other formats is folded into the factors. Ranks may
differ between layers.

A 1x1 convolution (stride 1, as every 1x1 convolution of the SD UNet: `proj_in` /
`proj_out` of its transformer blocks, `conv_shortcut` of its resnets) is a dense layer on
the channels. Its LoRA is two 1x1 convolutions, in the orientation of its Flax kernel
`K [1, 1, in, out]`:

    dW = down @ up        down [1, 1, in, r]   up [1, 1, r, out]   dW [1, 1, in, out]

(`@` batched over the two 1x1 axes), so that merging, files and exports need no base
model to tell the two kinds apart. Only imports of PyTorch LoRA files make such layers:
everything hdb-jax trains (LiDB, rank-relaxed finetuning) has dense layers only, and the
low-rank side path of training (hdb_jax/preopt.py) refuses convolutions.

Pytree (component -> Flax layer path without '/kernel' -> factors):
    {"unet": {"down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q":
                  {"down": [in, r], "up": [r, out]}},
     "text_encoder": {"text_model/encoder/layers/0/self_attn/q_proj": {...}}}

File: safetensors, keys "<component>/<layer path>/down|up" (float32), metadata
format "hdb-lora", version "1", and free-form provenance (source, base_fingerprint).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from hdb_jax import lidb
from hdb_jax import params as params_lib

FILE_FORMAT = "hdb-lora"
FILE_VERSION = "1"
FACTORS = ("down", "up")


def lidb_factors(train: Mapping, aux: Mapping) -> dict:
  """LiDB train values -> LoRA of rank `spec.rank`: down = D_aux @ D_train, up = U_train @
  U_aux, as JAX arrays (traceable: usable inside jit)."""
  return {component: {layer: {name: f[name] for name in FACTORS} for layer, f in layers.items()}
          for component, layers in lidb.factors(train, aux).items()}


def from_lidb(train: Mapping, spec: lidb.LiDBSpec, aux: Mapping | None = None) -> dict:
  """`lidb_factors` as float32 NumPy; `aux` defaults to the aux matrices of the spec's seed."""
  factors = lidb_factors(train, lidb.make_aux(spec) if aux is None else aux)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), factors)


CONV_1X1 = (1, 1)  # leading axes of the kernel and factors of a 1x1 convolution
RANDOM_INIT_SALT = "lora.random_init"  # keeps its keys apart from other uses of the seed


def random_init(shapes: Mapping, rank: int, seed: int) -> dict:
  """The usual LoRA initialization, as peft initializes `lora_A` / `lora_B` by default
  (`init_lora_weights=True`, after microsoft/LoRA): a zero residual with a random `down`.

      down [in, r] ~ U(-1/sqrt(in), 1/sqrt(in))    up [r, out] = 0    (dW = down @ up = 0)

  The bound is torch's `kaiming_uniform_(lora_A.weight, a=sqrt(5))` on lora_A [r, in]
  (fan_in = in): gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain * sqrt(3 / fan_in) =
  1 / sqrt(in). No alpha / rank scale (peft's with lora_alpha = r, diffusers' DreamBooth
  LoRA script's default). `shapes`: {component: {layer: kernel shape}} as `layer_shapes`
  gives, (in, out) or (1, 1, in, out) (a 1x1 convolution: fan_in = in as well).

  Deterministic: layer "<component>/<layer>" draws from threefry key
  fold_in(fold_in(key(seed), stable_hash32(RANDOM_INIT_SALT)),
  stable_hash32("<component>/<layer>")), so a layer's values depend on the seed, its path
  and its shape only. -> float32 NumPy LoRA pytree.
  """
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  base = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"),
                            params_lib.stable_hash32(RANDOM_INIT_SALT))
  out = {}
  for component, layers in shapes.items():
    out[component] = {}
    for layer, shape in layers.items():
      shape = tuple(int(d) for d in shape)
      if not (len(shape) == 2 or (len(shape) == 4 and shape[:2] == CONV_1X1)):
        raise ValueError(f"{component}/{layer}: kernel shape {list(shape)} is neither "
                         "[in, out] nor [1, 1, in, out]")
      in_dim, out_dim = shape[-2:]
      key = jax.random.fold_in(base, params_lib.stable_hash32(f"{component}/{layer}"))
      bound = 1.0 / np.sqrt(in_dim)
      down = jax.random.uniform(key, shape[:-1] + (rank,), np.float32, -bound, bound)
      out[component][layer] = {
          "down": np.asarray(down, np.float32),                              # [.., in, r]
          "up": np.zeros(shape[:-2] + (rank, out_dim), np.float32)}          # [.., r, out]
  return out


def kernel_shape(factors: Mapping) -> tuple[int, ...]:
  """Shape of the kernel that `down @ up` changes: (in, out), or (1, 1, in, out) for a
  1x1 convolution."""
  down, up = np.shape(factors["down"]), np.shape(factors["up"])
  return tuple(int(d) for d in down[:-1]) + (int(up[-1]),)


def layer_shapes(lora: Mapping) -> dict:
  """{component: {layer: kernel_shape}}: (in, out) of each dense layer the LoRA changes,
  (1, 1, in, out) of each 1x1 convolution."""
  return {component: {layer: kernel_shape(f) for layer, f in layers.items()}
          for component, layers in lora.items()}


def ranks(lora: Mapping) -> dict:
  """{component: {layer: r}}."""
  return {component: {layer: int(np.shape(f["down"])[-1]) for layer, f in layers.items()}
          for component, layers in lora.items()}


def changeable_kernels(component_params: Mapping) -> dict[str, tuple[int, ...]]:
  """{layer path (without '/kernel'): kernel shape} of the layers a LoRA can change: dense
  layers (in, out) and 1x1 convolutions (1, 1, in, out). `component_params` may be abstract."""
  found = {}
  for path, leaf in params_lib.flatten(component_params).items():
    shape = tuple(int(d) for d in leaf.shape)
    if path.endswith(params_lib.SEP + "kernel") and (
        len(shape) == 2 or (len(shape) == 4 and shape[:2] == CONV_1X1)):
      found[path[: -len(params_lib.SEP + "kernel")]] = shape
  return dict(sorted(found.items()))


def deltas(lora: Mapping) -> dict:
  """Residuals {component: {layer: dW = down @ up}}: [in, out] for dense layers,
  [1, 1, in, out] for 1x1 convolutions (the shape of the kernel)."""
  return {component: {layer: f["down"] @ f["up"] for layer, f in layers.items()}
          for component, layers in lora.items()}


def merge(frozen: Mapping[str, Mapping], lora: Mapping, scale: float = 1.0) -> dict:
  """Params with every changed kernel replaced by `K + scale * down @ up`. Pure, jittable.

  Dense kernels [in, out] and 1x1 convolution kernels [1, 1, in, out] alike: `down @ up`
  has the kernel's shape (`check_base` checks that a LoRA fits its base).

  Components without residuals are passed through unchanged (not copied).
  """
  merged = dict(frozen)
  for component, layer_deltas in deltas(lora).items():
    if component not in frozen:
      raise KeyError(f"LoRA component {component!r} not in params {sorted(frozen)}")
    merged[component] = params_lib.add_to_kernels(
        frozen[component], {layer: scale * delta for layer, delta in layer_deltas.items()})
  return merged


def concat(loras: list[Mapping], scales: list[float] | None = None) -> dict:
  """One LoRA whose dW is `sum_i scale_i * dW_i`, exactly: factors stacked on the rank axis.

  For example an identity and a style LoRA in one file. Layers present in only some of
  the inputs keep the factors they have.
  """
  scales = [1.0] * len(loras) if scales is None else list(scales)
  if len(scales) != len(loras):
    raise ValueError(f"{len(loras)} LoRAs but {len(scales)} scales")
  parts = {}
  for lora, scale in zip(loras, scales):
    for component, layers in lora.items():
      for layer, f in layers.items():
        parts.setdefault(component, {}).setdefault(layer, []).append(
            (np.asarray(f["down"], np.float32), np.float32(scale) * np.asarray(f["up"], np.float32)))
  # The rank axis: the last of `down` ([..., in, r]), the one before last of `up` ([..., r, out]).
  return {component: {layer: {"down": np.concatenate([d for d, _ in pairs], axis=-1),  # [.., in, sum r]
                              "up": np.concatenate([u for _, u in pairs], axis=-2)}    # [.., sum r, out]
                      for layer, pairs in layers.items()}
          for component, layers in parts.items()}


def check(lora: Mapping, where: str = "") -> None:
  """Raise ValueError unless every layer has finite factors down [in, r], up [r, out], or
  (a 1x1 convolution) down [1, 1, in, r], up [1, 1, r, out]."""
  for component, layers in lora.items():
    for layer, f in layers.items():
      name = f"{component}/{layer}"
      if set(f) != set(FACTORS):
        raise ValueError(f"{where}: LoRA layer {name} has factors {sorted(f)}, expected "
                         f"{list(FACTORS)}")
      down, up = np.shape(f["down"]), np.shape(f["up"])
      dense = len(down) == len(up) == 2
      conv_1x1 = len(down) == len(up) == 4 and down[:2] == up[:2] == CONV_1X1
      if not (dense or conv_1x1) or down[-1] != up[-2]:
        raise ValueError(f"{where}: LoRA layer {name} has factors down {down} and up {up}; "
                         "expected [in, r] and [r, out] (or [1, 1, in, r] and [1, 1, r, out] "
                         "for a 1x1 convolution)")
      for factor_name, value in f.items():
        if not np.all(np.isfinite(np.asarray(value))):
          raise ValueError(f"{where}: LoRA layer {name} ({factor_name}) has NaN or Inf values")


def check_base(lora: Mapping, params: Mapping[str, Mapping], where: str = "") -> None:
  """Raise ValueError unless every changed layer is a dense layer or 1x1 convolution of
  `params` whose kernel has the shape of `down @ up` (so dense factors never land on a
  convolution, nor the other way round).

  `params` may be abstract (jax.eval_shape): only paths and shapes are read.
  """
  for component, shapes in layer_shapes(lora).items():
    if component not in params:
      raise ValueError(f"{where}: LoRA component {component!r} not in the base model "
                       f"({sorted(params)})")
    kernels = changeable_kernels(params[component])
    for layer, shape in shapes.items():
      if layer not in kernels:
        raise ValueError(f"{where}: LoRA layer {component}/{layer} is not a dense layer or "
                         "1x1 convolution of the base model")
      if kernels[layer] != shape:
        raise ValueError(f"{where}: LoRA layer {component}/{layer} changes a "
                         f"{list(shape)} kernel; the base model's is {list(kernels[layer])} "
                         "(dense: [in, out], 1x1 convolution: [1, 1, in, out])")


# ------------------------------------------------------------------------------------
# Files

def save(path: str, lora: Mapping, metadata: Mapping[str, str] | None = None) -> None:
  """Write an hdb-lora file atomically (float32 factors, provenance in the metadata)."""
  import safetensors.numpy
  from hdb_jax import files
  check(lora, path)
  tensors = {f"{component}/{layer}/{name}": np.ascontiguousarray(f[name], np.float32)
             for component, layers in lora.items()
             for layer, f in layers.items() for name in FACTORS}
  header = {str(k): str(v) for k, v in (metadata or {}).items()}
  header.update(format=FILE_FORMAT, version=FILE_VERSION)
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=header)


def read_safetensors(path: str, tensors: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of any safetensors file, with errors that name the file.

  `tensors=False` reads the header only (tensors come back empty)."""
  import safetensors
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file")
  except Exception as e:  # safetensors raises its own error types on bad files
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
  return tensors, metadata


def load(path: str) -> tuple[dict, dict[str, str]]:
  """Read an hdb-lora file -> (LoRA pytree of float32 NumPy arrays, metadata). Checks it."""
  tensors, metadata = read_safetensors(path)
  if metadata.get("format") != FILE_FORMAT:
    raise ValueError(f"{path}: not an hdb-lora file (metadata format="
                     f"{metadata.get('format')!r})")
  lora = {}
  for key, value in tensors.items():
    component, _, rest = key.partition(params_lib.SEP)
    layer, _, name = rest.rpartition(params_lib.SEP)
    if not component or not layer or name not in FACTORS:
      raise ValueError(f"{path}: unexpected tensor {key!r} (expected "
                       "'<component>/<layer path>/down|up')")
    lora.setdefault(component, {}).setdefault(layer, {})[name] = value.astype(np.float32)
  check(lora, path)
  return lora, metadata


def read(path: str) -> tuple[dict, dict[str, str]]:
  """An hdb-jax weights file, LiDB or hdb-lora -> (LoRA pytree, metadata).

  A LiDB file needs no base model: it holds the layer shapes and the aux seed (or the
  learned aux matrices themselves).
  """
  _, metadata = read_safetensors(path, tensors=False)
  kind = metadata.get("format")
  if kind == lidb.FILE_FORMAT:
    train, aux, spec, metadata = lidb.load_with_aux(path)
    return from_lidb(train, spec, aux), metadata
  if kind == FILE_FORMAT:
    return load(path)
  raise ValueError(f"{path}: not an hdb-jax LiDB or LoRA file (metadata format={kind!r}); "
                   "PyTorch LoRA files are read with `hdb import`")
