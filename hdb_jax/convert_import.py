"""PyTorch LoRA files -> hdb-jax LoRA pytrees: the import side of hdb_jax/convert.py.

Formats read (SD1.x; safetensors; detected from the keys):

- "peft": `unet.<module>.lora_A.weight [r, in]`, `.lora_B.weight [out, r]`, the text
  encoder under `text_encoder.`, with diffusers' `lora_adapter_metadata` (`hdb export`).
- "diffusers": what diffusers' training scripts save
  (`convert_state_dict_to_diffusers(get_peft_model_state_dict(model))`, then
  `save_lora_weights`): UNet attention projections as `unet.<module>.lora.down.weight
  [r, in]` / `.lora.up.weight [out, r]`, text encoder layers as
  `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`; layers the
  conversion has no name for keep the PEFT spelling in the same file.
- "diffusers-old": attention processors (diffusers before PEFT):
  `unet.<attention>.processor.to_q_lora.down.weight` (to_q, to_k, to_v, to_out; UNet
  `to_out` is `to_out.0`), `text_encoder.<self_attn>.to_q_lora.up.weight` (to_q..to_out
  are q_proj..out_proj). Files of `unet.save_attn_procs` have no `unet.` prefix.
- "kohya": `lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`, `lora_te_<module>...`.
- hdb-jax files ("hdb-lora", "hdb-lidb").

Scale, as diffusers applies it: `dW_torch [out, in] = alpha / r * up @ down`. kohya: alpha
per module from `.alpha` (missing: alpha = r). PEFT-style files: `lora_alpha`,
`alpha_pattern`, `use_rslora` (alpha / sqrt(r)) from `lora_adapter_metadata`; without
metadata alpha = r (scale 1). The scale is folded into `up`.

Unsupported layers. hdb-jax applies LoRAs to dense layers only. A LoRA on a layer the
base has but hdb-jax cannot apply it to (convolutions, 1x1 included: LoCon / LyCORIS
files, PEFT convolution targets) is refused with a list of all such modules, or, with
`skip_unsupported=True`, left out and returned in `Imported.skipped`. A module the base
does not have at all is always an error (the file is for another base).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Mapping, NamedTuple

import numpy as np

from hdb_jax import convert, lidb
from hdb_jax import lora as lora_lib
from hdb_jax import params as params_lib

FORMATS = ("peft", "diffusers", "diffusers-old", "kohya")
# Factor spellings of PEFT-style keys: "<module>.<spelling>.weight" -> factor.
FACTOR_SPELLINGS = {"lora_A": "down", "lora_B": "up",                        # peft
                    "lora.down": "down", "lora.up": "up",                    # diffusers, UNet
                    "lora_linear_layer.down": "down", "lora_linear_layer.up": "up"}  # text encoder
# Attention-processor names of the old diffusers format -> PyTorch module (per component).
OLD_PROJECTIONS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                    "to_out": "out_proj"}}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
FACTOR_NAMES = {"down": "lora_A / lora.down / lora_down", "up": "lora_B / lora.up / lora_up"}

_PEFT_STYLE_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<spelling>lora_A|lora_B|lora\.down|lora\.up|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")
_OLD_KEY = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\."
    r"(?P<factor>down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<name>lora_[a-z0-9]+_.+?)\.(?P<part>[^.]+(?:\.weight)?)$")
# LyCORIS algorithms other than LoRA / LoCon (their own factors, not down @ up).
_LYCORIS_PARTS = re.compile(r"^(hada_|lokr_|oft_|dora_scale|diff|w_norm|b_norm)")


class Imported(NamedTuple):
  """`load`'s result: the LoRA pytree, the detected format, and the modules (named as in
  the file) that were left out because hdb-jax cannot apply them."""
  lora: dict
  format: str
  skipped: tuple[str, ...]


# ------------------------------------------------------------------------------------
# Formats

def detect_format(tensors: Mapping, metadata: Mapping[str, str]) -> str:
  """One of FORMATS, "hdb-lora" or "hdb-lidb"; ValueError for anything else."""
  if metadata.get("format") in (lora_lib.FILE_FORMAT, lidb.FILE_FORMAT):
    return metadata["format"]
  if tensors and all(k.startswith("lora_") for k in tensors):
    return "kohya"
  if any(_OLD_KEY.match(k) for k in tensors):
    return "diffusers-old"
  spellings = {m.group("spelling") for m in map(_PEFT_STYLE_KEY.match, tensors) if m}
  if spellings - {"lora_A", "lora_B"}:
    return "diffusers"
  if spellings:
    return "peft"
  raise ValueError(
      "not a LoRA file of a known format: PEFT (unet.<module>.lora_A.weight), diffusers "
      "(….lora.down.weight, ….lora_linear_layer.down.weight), diffusers attention processors "
      f"(….processor.to_q_lora.down.weight) or kohya (lora_unet_…, lora_te_…); first keys: "
      f"{sorted(tensors)[:3]}")


def _peft_style_modules(tensors: Mapping[str, np.ndarray], where: str) -> tuple[dict, dict]:
  """PEFT, diffusers and diffusers-old keys -> ({(component, module): {factor: (key, value)}},
  {(component, module): name in the file}). Unprefixed files are UNet files."""
  prefixes = {prefix: component for component, prefix in convert.PEFT_PREFIX.items()}
  prefixed = any(k.partition(".")[0] in prefixes for k in tensors)
  modules, labels = {}, {}
  for key, value in tensors.items():
    head, _, rest = key.partition(".")
    component, prefix = prefixes.get(head), head
    if not prefixed:
      component, prefix, rest = "unet", "", key
    old, new = _OLD_KEY.match(rest), _PEFT_STYLE_KEY.match(rest)
    if component is None or not (old or new):
      raise ValueError(f"{where}: unknown key {key!r} (expected unet.<module> or "
                       "text_encoder.<module> followed by .lora_A.weight / .lora_B.weight, "
                       ".lora.down.weight / .lora.up.weight, .lora_linear_layer.down.weight / "
                       ".up.weight, or an attention's [.processor].to_q_lora.down.weight / "
                       ".up.weight (to_q, to_k, to_v, to_out))")
    if old:
      module = f"{old.group('parent')}.{OLD_PROJECTIONS[component][old.group('projection')]}"
      factor = old.group("factor")
    else:
      module, factor = new.group("module"), FACTOR_SPELLINGS[new.group("spelling")]
    factors = modules.setdefault((component, module), {})
    if factor in factors:
      raise ValueError(f"{where}: {key!r} and {factors[factor][0]!r} are the same factor of "
                       f"{component} module {module!r}")
    factors[factor] = (key, value)
    labels[(component, module)] = f"{prefix}.{module}" if prefix else module
  return modules, labels


def _kohya_modules(tensors: Mapping[str, np.ndarray], names: Mapping[str, tuple[str, str]],
                   where: str) -> tuple[dict, dict]:
  """kohya keys -> ({(component, module): {"down"|"up"|"alpha": (key, value)}}, labels).
  `names`: {kohya name: (component, PyTorch module)} of every layer of the base."""
  modules, labels = {}, {}
  for key, value in tensors.items():
    match = _KOHYA_KEY.match(key)
    part = KOHYA_PARTS.get(match.group("part")) if match else None
    if part is None:
      hint = (" (LyCORIS LoHa / LoKr / OFT / DoRA / full weight-difference tensors are not "
              "LoRA factors)" if match and _LYCORIS_PARTS.match(match.group("part")) else "")
      raise ValueError(f"{where}: unknown key {key!r}{hint}; expected lora_unet_<module>."
                       "lora_down.weight, .lora_up.weight, .alpha, or the same with lora_te_")
    if match.group("name") not in names:
      raise ValueError(f"{where}: key {key!r}: the base model has no layer named "
                       f"{match.group('name')!r}")
    component, module = names[match.group("name")]
    modules.setdefault((component, module), {})[part] = (key, value)
    labels[(component, module)] = match.group("name")
  return modules, labels


# ------------------------------------------------------------------------------------
# Layers and factors

def unsupported_layers(base: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
  """{component: {PyTorch module: what it is}} of the base's layers with a kernel that is
  not dense (convolutions, e.g. "3x3 convolution"): LoRAs on them cannot be applied.
  Names are checked against the PyTorch->Flax rule of `models.load`, like `torch_names`."""
  from hdb_jax import models
  import flax
  table = {}
  for component in convert.PEFT_PREFIX:
    if component not in base:
      continue
    expected_flat = flax.traverse_util.flatten_dict(base[component])
    table[component] = {}
    for path, leaf in params_lib.flatten(base[component]).items():
      if not path.endswith(params_lib.SEP + "kernel") or len(leaf.shape) == 2:
        continue
      layer = path[: -len(params_lib.SEP + "kernel")]
      module = convert.torch_module(component, layer)
      torch_shape = (leaf.shape[-1], leaf.shape[-2], *leaf.shape[:-2])  # [out, in, kh, kw]
      flax_key = models.torch_key_to_flax(module + ".weight", torch_shape, expected_flat,
                                          component)
      if params_lib.SEP.join(flax_key) != path:
        raise RuntimeError(f"hdb-jax names {component}/{layer} {module!r} in PyTorch, but "
                           f"PyTorch loading maps that back to {'/'.join(flax_key)}")
      size = "x".join(str(d) for d in leaf.shape[:-2])
      table[component][module] = f"{size} convolution" if len(leaf.shape) == 4 else "not dense"
  return table


def _fit(where: str, key: str, value: np.ndarray, shape: tuple[int, int],
         what: str) -> np.ndarray:
  """Check a [out, in]-style PyTorch factor against the base layer (in, out); -> float32."""
  if value.ndim != 2:
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; only 2-D (dense layer) "
                     "LoRA factors are supported")
  in_dim, out_dim = shape
  if (what == "down" and value.shape[1] != in_dim) or (what == "up" and value.shape[0] != out_dim):
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, which does not fit the "
                     f"base model's layer ([out, in] = {[out_dim, in_dim]})")
  value = np.asarray(value, np.float32)
  if not np.all(np.isfinite(value)):
    raise ValueError(f"{where}: {key} has NaN or Inf values")
  return value


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


def _adapter_configs(metadata: Mapping[str, str], where: str) -> dict[str, dict]:
  """{component: PEFT LoraConfig dict} from `lora_adapter_metadata` (empty without it)."""
  raw = metadata.get(convert.ADAPTER_METADATA_KEY)
  try:
    adapter = json.loads(raw) if raw else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: metadata {convert.ADAPTER_METADATA_KEY} is not JSON ({e})") from e
  configs = {}
  for component, prefix in convert.PEFT_PREFIX.items():
    configs[component] = {k[len(prefix) + 1:]: v for k, v in adapter.items()
                          if k.startswith(prefix + ".")}
    if configs[component].get("use_dora"):
      raise ValueError(f"{where}: DoRA adapters are not supported")
  return configs


def _kohya_alpha(where: str, factors: Mapping, rank: int) -> float:
  if "alpha" not in factors:
    return float(rank)
  key, value = factors["alpha"]
  if np.size(value) != 1:
    raise ValueError(f"{where}: {key} has shape {tuple(np.shape(value))}, expected a scalar")
  return float(np.asarray(value, np.float64).reshape(()))


def _to_lora(modules: Mapping, labels: Mapping, dense: Mapping, other: Mapping, where: str,
             scale: Callable[[str, str, Mapping, int], float],
             skip_unsupported: bool) -> tuple[dict, tuple[str, ...]]:
  """Grouped PyTorch factors -> (LoRA pytree {"down": [in, r], "up": [r, out]}, skipped).

  `dense`: `convert.torch_names(base)`; `other`: `unsupported_layers(base)`;
  `scale(component, module, factors, r)`: alpha / r of a module."""
  lora, unsupported = {}, []
  for (component, module), factors in sorted(modules.items()):
    label = labels[(component, module)]
    if module in other.get(component, {}):
      unsupported.append(f"{label} ({other[component][module]})")
      continue
    if module not in dense.get(component, {}):
      raise ValueError(f"{where}: {label}: the base model has no layer {module!r} in its "
                       f"{component}")
    for factor in ("down", "up"):
      if factor not in factors:
        raise ValueError(f"{where}: {label}: the {factor} factor ({FACTOR_NAMES[factor]}) "
                         "is missing")
    layer, shape = dense[component][module]
    down_t = _fit(where, *factors["down"], shape, "down")  # [r, in]
    up_t = _fit(where, *factors["up"], shape, "up")        # [out, r]
    if down_t.shape[0] != up_t.shape[1]:
      raise ValueError(f"{where}: {label}: ranks of the two factors differ "
                       f"({down_t.shape[0]} vs {up_t.shape[1]})")
    module_scale = scale(component, module, factors, down_t.shape[0])
    if not math.isfinite(module_scale):
      raise ValueError(f"{where}: {label}: alpha / rank is not finite")
    up = up_t.T if module_scale == 1.0 else up_t.T * np.float32(module_scale)
    lora.setdefault(component, {})[layer] = {"down": np.ascontiguousarray(down_t.T),
                                             "up": np.ascontiguousarray(up)}
  if unsupported and not skip_unsupported:
    raise ValueError(
        f"{where}: {len(unsupported)} LoRA module(s) on layers hdb-jax cannot apply (it "
        "applies LoRAs to dense layers only): " + ", ".join(unsupported)
        + ". Leave them out with `hdb import --skip-unsupported` (library: "
        "skip_unsupported=True); the imported LoRA then differs from the file's.")
  if not lora:
    raise ValueError(f"{where}: no LoRA module of the file is on a layer hdb-jax can apply")
  return lora, tuple(unsupported)


def from_peft_style(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str],
                    base: Mapping[str, Mapping], where: str = "",
                    skip_unsupported: bool = False) -> tuple[dict, tuple[str, ...]]:
  """PEFT, diffusers or diffusers-old tensors (+ metadata) -> (LoRA pytree, skipped)."""
  configs = _adapter_configs(metadata, where)
  modules, labels = _peft_style_modules(tensors, where)
  return _to_lora(modules, labels, convert.torch_names(base), unsupported_layers(base), where,
                  lambda component, module, _, rank: _peft_scale(configs[component], module, rank),
                  skip_unsupported)


def from_kohya(tensors: Mapping[str, np.ndarray], base: Mapping[str, Mapping],
               where: str = "", skip_unsupported: bool = False) -> tuple[dict, tuple[str, ...]]:
  """kohya tensors -> (LoRA pytree, skipped). A module without `.alpha` has alpha = r."""
  dense, other = convert.torch_names(base), unsupported_layers(base)
  names = {}
  for table in (dense, other):
    for component, modules in table.items():
      names.update({convert.KOHYA_PREFIX[component] + module.replace(".", "_"): (component, module)
                    for module in modules})
  modules, labels = _kohya_modules(tensors, names, where)
  return _to_lora(modules, labels, dense, other, where,
                  lambda _, __, factors, rank: _kohya_alpha(where, factors, rank) / rank,
                  skip_unsupported)


def load(path: str, base: Mapping[str, Mapping], skip_unsupported: bool = False) -> Imported:
  """Read a PyTorch LoRA file (any of FORMATS; hdb-jax files too) -> Imported.

  Every module must be a dense layer of `base` (abstract params suffice) with fitting
  shapes and finite values, or (`skip_unsupported`) a layer hdb-jax cannot apply a LoRA
  to, which is left out; otherwise ValueError naming the file and the problem.
  """
  tensors, metadata = lora_lib.read_safetensors(path)
  if not tensors:
    raise ValueError(f"{path}: the file holds no tensors")
  try:
    fmt = detect_format(tensors, metadata)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  skipped = ()
  if fmt == "kohya":
    lora, skipped = from_kohya(tensors, base, path, skip_unsupported)
  elif fmt in FORMATS:
    lora, skipped = from_peft_style(tensors, metadata, base, path, skip_unsupported)
  else:
    lora, _ = lora_lib.read(path)
  lora_lib.check(lora, path)
  lora_lib.check_base(lora, base, path)
  return Imported(lora, fmt, skipped)
