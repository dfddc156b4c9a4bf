"""PyTorch LoRA files <-> hdb-jax LoRA pytrees (hdb_jax/lora.py).

Two PyTorch formats, both safetensors with float32 weights and `format: pt`:

- PEFT / diffusers (`pipe.load_lora_weights(file)`):
      unet.<module>.lora_A.weight [r, in]    unet.<module>.lora_B.weight [out, r]
      text_encoder.text_model.encoder.layers.<i>.self_attn.q_proj.lora_A.weight ...
  plus `lora_adapter_metadata` (JSON: "unet.r", "unet.lora_alpha", "unet.target_modules",
  rank/alpha patterns, the same under "text_encoder."), as diffusers 0.39 writes and reads.
- kohya (A1111, ComfyUI, diffusers' kohya conversion):
      lora_unet_<module with _>.lora_down.weight [r, in], .lora_up.weight [out, r], .alpha
      lora_te_text_model_encoder_layers_<i>_self_attn_q_proj.lora_down.weight ...
  and `ss_network_dim`, `ss_network_alpha`, `ss_network_module`, `ss_base_model_version`.
  One alpha for the whole file (diffusers' kohya loader expects that).

Both give `dW_torch [out, in] = scale * B @ A` with `scale = alpha / r`; hdb-jax keeps
`dW [in, out] = down @ up` (Flax kernels are the transposes), so `A = down.T`,
`B = scale^-1 * up.T`. Exports set alpha = r wherever they can (scale 1, factors stored
unchanged), so import(export(x)) == x exactly.

Module names. Flax flattens PyTorch ModuleLists into `<list>_<i>` segments
(`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0` is
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`), while names such
as `time_embedding/linear_1` keep their underscore, so the PyTorch name is recovered
from the list names of diffusers' UNet (`torch_module`). Exports need no base model;
imports check every name against the base model with the PyTorch->Flax rule that
`models.load` uses, so the two directions cannot drift apart silently.
"""

from __future__ import annotations

import collections
import json
import math
import re
from typing import Mapping

import numpy as np

from hdb_jax import files, lidb
from hdb_jax import lora as lora_lib
from hdb_jax import params as params_lib

FORMATS = ("peft", "kohya")
# Component -> key prefix of each format (diffusers StableDiffusionLoraLoaderMixin names).
PEFT_PREFIX = {"unet": "unet", "text_encoder": "text_encoder"}
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base's key
# ModuleLists / nn.Sequentials of diffusers' UNet2DConditionModel: Flax names their
# items "<list>_<i>", PyTorch "<list>.<i>".
UNET_MODULE_LISTS = ("down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks",
                     "to_out", "net", "downsamplers", "upsamplers")

_PEFT_KEY = re.compile(r"^(?P<prefix>[^.]+)\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_KOHYA_KEY = re.compile(
    r"^(?P<name>lora_[a-z0-9]+_.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


# ------------------------------------------------------------------------------------
# Names

def torch_module(component: str, layer: str) -> str:
  """Flax layer path -> PyTorch module name, e.g. `.../attn1/to_out_0` -> `....attn1.to_out.0`."""
  if component not in PEFT_PREFIX:
    raise ValueError(f"no PyTorch LoRA names for component {component!r} "
                     f"(supported: {sorted(PEFT_PREFIX)})")
  names = []
  for segment in layer.split(params_lib.SEP):
    match = re.fullmatch(r"(.+)_(\d+)", segment)
    if component == "unet" and match and match.group(1) in UNET_MODULE_LISTS:
      names += [match.group(1), match.group(2)]
    else:
      names.append(segment)
  return ".".join(names)


def kohya_name(component: str, layer: str) -> str:
  """Flax layer path -> kohya LoRA name, e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`."""
  return KOHYA_PREFIX[component] + torch_module(component, layer).replace(".", "_")


def torch_names(base: Mapping[str, Mapping]) -> dict[str, dict[str, tuple[str, tuple[int, int]]]]:
  """{component: {PyTorch module: (Flax layer, (in, out))}} for every dense layer of `base`.

  `base` may be abstract params. Each name is checked against the PyTorch->Flax rule of
  `models.load` (diffusers' for the UNet, transformers' for CLIP).
  """
  from hdb_jax import models
  import flax
  table = {}
  for component in PEFT_PREFIX:
    if component not in base:
      continue
    expected_flat = flax.traverse_util.flatten_dict(base[component])
    table[component] = {}
    for layer, (in_dim, out_dim) in params_lib.find_kernels(base[component], ".*").items():
      module = torch_module(component, layer)
      flax_key = models.torch_key_to_flax(module + ".weight", (out_dim, in_dim), expected_flat,
                                          component)
      if params_lib.SEP.join(flax_key) != layer + params_lib.SEP + "kernel":
        raise RuntimeError(f"hdb-jax names {component}/{layer} {module!r} in PyTorch, but "
                           f"PyTorch loading maps that back to {'/'.join(flax_key)}")
      table[component][module] = (layer, (in_dim, out_dim))
  return table


# ------------------------------------------------------------------------------------
# Export

def _common_rank(layer_ranks: Mapping[str, int]) -> int:
  return collections.Counter(layer_ranks.values()).most_common(1)[0][0]


def to_peft(lora: Mapping) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """LoRA pytree -> (PEFT/diffusers tensors, safetensors metadata). No base model needed.

  `lora_alpha` = `r` for every layer (rank_pattern = alpha_pattern where ranks differ),
  so PEFT's scale is 1 and the factors are stored as they are.
  """
  lora_lib.check(lora, "export")
  tensors, adapter_metadata = {}, {}
  for component, layers in sorted(lora.items()):
    prefix = PEFT_PREFIX.get(component)
    if prefix is None:
      raise ValueError(f"cannot export component {component!r} (supported: {sorted(PEFT_PREFIX)})")
    layer_ranks = {}
    for layer, f in sorted(layers.items()):
      module = torch_module(component, layer)
      tensors[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(f["down"].T, np.float32)
      tensors[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(f["up"].T, np.float32)
      layer_ranks[module] = int(f["down"].shape[1])
    rank = _common_rank(layer_ranks)
    # PEFT matches pattern keys as regexes against the end of module names.
    pattern = {re.escape(module): r for module, r in layer_ranks.items() if r != rank}
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": pattern,
              "target_modules": sorted(layer_ranks), "use_dora": False, "lora_bias": False}
    adapter_metadata.update({f"{prefix}.{key}": value for key, value in config.items()})
  metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, sort_keys=True)}
  return tensors, metadata


def to_kohya(lora: Mapping) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """LoRA pytree -> (kohya tensors, safetensors metadata). No base model needed.

  One alpha for the file: the most common rank. Layers of another rank r get their
  `up` multiplied by r / alpha, so that `alpha / r * down @ up` is still `dW`.
  """
  lora_lib.check(lora, "export")
  layer_ranks = {(c, layer): int(f["down"].shape[1])
                 for c, layers in lora.items() for layer, f in layers.items()}
  if not layer_ranks:
    raise ValueError("export: the LoRA has no layers")
  alpha = _common_rank(layer_ranks)
  tensors = {}
  for component, layers in sorted(lora.items()):
    if component not in KOHYA_PREFIX:
      raise ValueError(f"cannot export component {component!r} (supported: {sorted(KOHYA_PREFIX)})")
    for layer, f in sorted(layers.items()):
      name = kohya_name(component, layer)
      rank = layer_ranks[(component, layer)]
      up = np.asarray(f["up"], np.float32)
      if rank != alpha:
        up = up * np.float32(rank / alpha)
      tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(f["down"].T, np.float32)  # [r, in]
      tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up.T)                      # [out, r]
      tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  metadata = {"format": "pt", "ss_network_module": "networks.lora",
              "ss_network_dim": str(alpha), "ss_network_alpha": str(alpha),
              "ss_base_model_version": "sd_v1", "ss_v2": "False"}
  return tensors, metadata


def export(lora: Mapping, path: str, fmt: str,
           extra_metadata: Mapping[str, str] | None = None) -> dict[str, str]:
  """Write `lora` as a PyTorch LoRA file (`fmt` "peft" or "kohya"), atomically.

  Returns the file's metadata. `extra_metadata` (provenance) is added as given.
  """
  import safetensors.numpy
  if fmt not in FORMATS:
    raise ValueError(f"unknown LoRA format {fmt!r} (expected one of {FORMATS})")
  tensors, metadata = (to_peft if fmt == "peft" else to_kohya)(lora)
  metadata = {**{str(k): str(v) for k, v in (extra_metadata or {}).items()}, **metadata}
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  return metadata


# ------------------------------------------------------------------------------------
# Import

def detect_format(tensors: Mapping, metadata: Mapping[str, str]) -> str:
  """"peft", "kohya", "hdb-lora" or "hdb-lidb"; ValueError for anything else."""
  if metadata.get("format") in (lora_lib.FILE_FORMAT, lidb.FILE_FORMAT):
    return metadata["format"]
  if tensors and all(k.startswith("lora_") for k in tensors):
    return "kohya"
  if any(".lora_A." in k or ".lora_B." in k for k in tensors):
    return "peft"
  raise ValueError("not a PEFT/diffusers (…lora_A.weight) or kohya (lora_unet_…, lora_te_…) "
                   f"LoRA file (first keys: {sorted(tensors)[:3]})")


def _fit(where: str, key: str, value: np.ndarray, shape: tuple[int, int],
         what: str) -> np.ndarray:
  """Check a [out, in]-style PyTorch factor against the base layer; -> float32."""
  if value.ndim != 2:
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; only 2-D (dense layer) "
                     "LoRA factors are supported")
  if (what == "down" and value.shape[1] != shape[0]) or (what == "up" and value.shape[0] != shape[1]):
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, which does not fit the "
                     f"base model's layer ([out, in] = {[shape[1], shape[0]]})")
  value = np.asarray(value, np.float32)
  if not np.all(np.isfinite(value)):
    raise ValueError(f"{where}: {key} has NaN or Inf values")
  return value


def _pair(where: str, module_key: str, down_t: np.ndarray, up_t: np.ndarray,
          scale: float) -> dict:
  """PyTorch A [r, in], B [out, r], scale -> {"down": [in, r], "up": [r, out]}."""
  if down_t.shape[0] != up_t.shape[1]:
    raise ValueError(f"{where}: {module_key}: ranks of the two factors differ "
                     f"({down_t.shape[0]} vs {up_t.shape[1]})")
  if not math.isfinite(scale):
    raise ValueError(f"{where}: {module_key}: alpha / rank is not finite")
  up = up_t.T if scale == 1.0 else up_t.T * np.float32(scale)
  return {"down": np.ascontiguousarray(down_t.T), "up": np.ascontiguousarray(up)}


def _peft_scale(config: Mapping, module: str, rank: int) -> float:
  """alpha / r of one module under a PEFT LoraConfig dict (PEFT's pattern rules)."""
  def lookup(patterns, default):
    for pattern, value in (patterns or {}).items():
      # As peft.utils.other.get_pattern_key; peft is a test dependency only.
      if re.match(rf"(.*\.)?({pattern})$", module):
        return value
    return default
  alpha = float(lookup(config.get("alpha_pattern"), config.get("lora_alpha", rank)))
  return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def from_peft(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
              base: Mapping[str, Mapping], where: str = "") -> dict:
  """PEFT/diffusers tensors (+ metadata) -> LoRA pytree, checked against `base`.

  Without `lora_adapter_metadata`, lora_alpha = r (scale 1), as diffusers assumes.
  """
  names = torch_names(base)
  prefixes = {prefix: component for component, prefix in PEFT_PREFIX.items()}
  adapter = {}
  if metadata.get(ADAPTER_METADATA_KEY):
    try:
      adapter = json.loads(metadata[ADAPTER_METADATA_KEY])
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: metadata {ADAPTER_METADATA_KEY} is not JSON ({e})") from e
  grouped = {}
  for key, value in tensors.items():
    match = _PEFT_KEY.match(key)
    component = prefixes.get(match.group("prefix")) if match else None
    if component is None:
      raise ValueError(f"{where}: unknown key {key!r} (expected unet.<module>.lora_A.weight, "
                       "…lora_B.weight, or the same under text_encoder.)")
    if component not in names or match.group("module") not in names[component]:
      raise ValueError(f"{where}: key {key!r}: the base model has no dense layer "
                       f"{match.group('module')!r} in its {component}")
    grouped.setdefault((component, match.group("module")), {})[match.group("factor")] = (key, value)
  lora = {}
  for (component, module), factors in sorted(grouped.items()):
    prefix = PEFT_PREFIX[component]
    config = {k[len(prefix) + 1:]: v for k, v in adapter.items() if k.startswith(prefix + ".")}
    if config.get("use_dora"):
      raise ValueError(f"{where}: DoRA adapters are not supported")
    missing = {"lora_A", "lora_B"} - set(factors)
    if missing:
      raise ValueError(f"{where}: {prefix}.{module}: {sorted(missing)[0]}.weight is missing")
    layer, shape = names[component][module]
    down_t = _fit(where, factors["lora_A"][0], factors["lora_A"][1], shape, "down")
    up_t = _fit(where, factors["lora_B"][0], factors["lora_B"][1], shape, "up")
    scale = _peft_scale(config, module, down_t.shape[0])
    lora.setdefault(component, {})[layer] = _pair(where, f"{prefix}.{module}", down_t, up_t, scale)
  return lora


def from_kohya(tensors: Mapping[str, np.ndarray], base: Mapping[str, Mapping],
               where: str = "") -> dict:
  """kohya tensors -> LoRA pytree, checked against `base`. A missing alpha means alpha = r."""
  names = {kohya_name(component, layer): (component, layer, shape)
           for component, modules in torch_names(base).items()
           for layer, shape in modules.values()}
  grouped = {}
  for key, value in tensors.items():
    match = _KOHYA_KEY.match(key)
    if match is None:
      raise ValueError(f"{where}: unknown key {key!r} (expected lora_unet_<module>."
                       "lora_down.weight, .lora_up.weight, .alpha, or the same with lora_te_)")
    if match.group("name") not in names:
      raise ValueError(f"{where}: key {key!r}: the base model has no dense layer named "
                       f"{match.group('name')!r}")
    grouped.setdefault(match.group("name"), {})[match.group("part")] = (key, value)
  lora = {}
  for name, parts in sorted(grouped.items()):
    component, layer, shape = names[name]
    for part in ("lora_down.weight", "lora_up.weight"):
      if part not in parts:
        raise ValueError(f"{where}: {name}.{part} is missing")
    down_t = _fit(where, *parts["lora_down.weight"], shape, "down")
    up_t = _fit(where, *parts["lora_up.weight"], shape, "up")
    rank = down_t.shape[0]
    alpha = float(rank)
    if "alpha" in parts:
      key, value = parts["alpha"]
      if np.size(value) != 1:
        raise ValueError(f"{where}: {key} has shape {tuple(np.shape(value))}, expected a scalar")
      alpha = float(np.asarray(value, np.float64).reshape(()))
    lora.setdefault(component, {})[layer] = _pair(where, name, down_t, up_t, alpha / rank)
  return lora


def load(path: str, base: Mapping[str, Mapping]) -> tuple[dict, str]:
  """Read a PyTorch LoRA file (PEFT or kohya; hdb-jax files too) -> (LoRA pytree, format).

  Every layer must be a dense layer of `base` (abstract params suffice) with a fitting
  shape, and every value finite; otherwise ValueError naming the file and the problem.
  """
  tensors, metadata = lora_lib.read_safetensors(path)
  if not tensors:
    raise ValueError(f"{path}: the file holds no tensors")
  try:
    fmt = detect_format(tensors, metadata)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  if fmt == "peft":
    lora = from_peft(tensors, metadata, base, path)
  elif fmt == "kohya":
    lora = from_kohya(tensors, base, path)
  else:
    lora, _ = lora_lib.read(path)
  lora_lib.check(lora, path)
  lora_lib.check_base(lora, base, path)
  return lora, fmt
