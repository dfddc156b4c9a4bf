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
  are q_proj..out_proj). Files of `unet.save_attn_procs` have no `unet.` prefix
  (diffusers 0.42 reads those with `unet.load_lora_adapter(file, prefix=None)`).
- "kohya": `lora_unet_<module, dots as _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`, `lora_te_<module>...`.
- hdb-jax files ("hdb-lora", "hdb-lidb").

Text-encoder names come in two spellings, both read: `text_model.encoder.layers.<i>...`
(checkpoints, transformers 4, kohya's `lora_te_text_model_encoder_...`, `hdb export`) and
`encoder.layers.<i>...` (transformers 5's modules: what diffusers / PEFT training scripts
save today; kohya `lora_te_encoder_...`). Both are the same layer (`lora_names.module_name`);
a file giving one factor under both is refused.

Scale, as diffusers applies it: `dW_torch [out, in] = alpha / r * up @ down`. kohya: alpha
per module from `.alpha` (missing: alpha = r). PEFT-style files: `lora_alpha`,
`alpha_pattern`, `use_rslora` (alpha / sqrt(r)) from `lora_adapter_metadata` (a pattern
applies to a text-encoder layer if it matches either spelling of its name, as PEFT
matches it in the module tree it was written for); without metadata alpha = r (scale 1).
The scale is folded into `up`.

Layers. hdb-jax applies LoRAs to dense layers (`A [r, in]`, `B [out, r]`) and to 1x1
convolutions, which are dense layers on the channels: `proj_in` / `proj_out` of SD1.x's
transformer blocks (kohya's default LoRA trains them) and the resnets' `conv_shortcut`,
with PyTorch's convolution factors `A [r, in, 1, 1]`, `B [out, r, 1, 1]` (imported as
`down [1, 1, in, r]`, `up [1, 1, r, out]`, hdb_jax/lora.py). A LoRA on a layer the base
has but hdb-jax cannot apply it to (larger convolutions: 3x3 LoCon / LyCORIS, PEFT
`conv1`-style targets) is refused with a list of all such modules, or, with
`skip_unsupported=True`, left out and returned in `Imported.skipped`. A module the base
does not have at all is always an error (the file is for another base).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Mapping, NamedTuple

import numpy as np

from hdb_jax import lidb
from hdb_jax import lora_names
from hdb_jax import lora as lora_lib

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
  {(component, module): name in the file}); modules named as `lora_names.module_name` gives
  them. Unprefixed files are UNet files."""
  prefixes = {prefix: component for component, prefix in lora_names.PEFT_PREFIX.items()}
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
    label = f"{prefix}.{module}" if prefix else module
    module = lora_names.module_name(component, module)
    factors = modules.setdefault((component, module), {})
    if factor in factors:
      raise ValueError(f"{where}: {key!r} and {factors[factor][0]!r} are the same factor of "
                       f"{component} module {module!r}")
    factors[factor] = (key, value)
    labels[(component, module)] = label
  return modules, labels


def _kohya_modules(tensors: Mapping[str, np.ndarray], names: Mapping[str, tuple[str, str]],
                   where: str) -> tuple[dict, dict]:
  """kohya keys -> ({(component, module): {"down"|"up"|"alpha": (key, value)}}, labels).
  `names`: {kohya name: (component, PyTorch module)} of every layer of the base, in every
  spelling (`lora_te_text_model_encoder_...` and `lora_te_encoder_...`)."""
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
    factors = modules.setdefault((component, module), {})
    if part in factors:
      raise ValueError(f"{where}: {key!r} and {factors[part][0]!r} are the same {part} of "
                       f"{component} module {module!r}")
    factors[part] = (key, value)
    labels[(component, module)] = match.group("name")
  return modules, labels


# ------------------------------------------------------------------------------------
# Layers and factors

def _kind(kernel_shape: tuple[int, ...]) -> str:
  """'dense layer', '1x1 convolution', '3x3 convolution', ... of a Flax kernel shape."""
  if len(kernel_shape) == 2:
    return "dense layer"
  if len(kernel_shape) == 4:
    return "x".join(str(d) for d in kernel_shape[:2]) + " convolution"
  return "not dense"


def _split_layers(base: Mapping[str, Mapping]) -> tuple[dict, dict]:
  """`lora_names.torch_kernel_names(base)` split into the layers a LoRA can be applied to
  (`lora.changeable_kernels`: dense and 1x1 convolutions) and the others."""
  applicable, other = {}, {}
  for component, modules in lora_names.torch_kernel_names(base).items():
    changeable = lora_lib.changeable_kernels(base[component])
    applicable[component], other[component] = {}, {}
    for module, (layer, shape) in modules.items():
      (applicable if layer in changeable else other)[component][module] = (layer, shape)
  return applicable, other


def lora_layers(base: Mapping[str, Mapping]) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
  """{component: {PyTorch module: (Flax layer, Flax kernel shape)}} of the base's layers a
  LoRA can be applied to: dense layers [in, out] and 1x1 convolutions [1, 1, in, out].
  Modules named as in current diffusers / transformers, checked against the base's key
  map (`lora_names.torch_kernel_names`)."""
  return _split_layers(base)[0]


def unsupported_layers(base: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
  """{component: {PyTorch module: what it is}} of the base's layers with a kernel that a
  LoRA cannot be applied to (convolutions larger than 1x1, e.g. "3x3 convolution")."""
  return {component: {module: _kind(shape) for module, (_, shape) in modules.items()}
          for component, modules in _split_layers(base)[1].items()}


def _fit(where: str, key: str, value: np.ndarray, kernel_shape: tuple[int, ...],
         what: str) -> np.ndarray:
  """Check a PyTorch factor (down `A [r, in]`, up `B [out, r]`; for a 1x1 convolution
  `[r, in, 1, 1]`, `[out, r, 1, 1]`) against the base layer's Flax kernel shape
  ([in, out] or [1, 1, in, out]) -> the factor in Flax layout (`lora_names.flax_layout`,
  float32): down [(1, 1,) in, r], up [(1, 1,) r, out]."""
  *spatial, in_dim, out_dim = kernel_shape
  if value.ndim != len(kernel_shape) or tuple(value.shape[2:]) != tuple(spatial):
    expected = ("only 2-D LoRA factors fit it" if not spatial else
                "only [r, in, 1, 1] / [out, r, 1, 1] LoRA factors fit it")
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; the base model's layer "
                     f"is a {_kind(kernel_shape)}: {expected}")
  if (what == "down" and value.shape[1] != in_dim) or (what == "up" and value.shape[0] != out_dim):
    raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, which does not fit the "
                     f"base model's layer ([out, in] = {[out_dim, in_dim]})")
  if not np.all(np.isfinite(value)):
    raise ValueError(f"{where}: {key} has NaN or Inf values")
  return lora_names.flax_layout(value)


def _peft_scale(config: Mapping, names: tuple[str, ...], rank: int) -> float:
  """alpha / r of one module under a PEFT LoraConfig dict (PEFT's pattern rules); `names`:
  the module's spellings (`lora_names.file_spellings`), a pattern matching any applies."""
  def lookup(patterns, default):
    for pattern, value in (patterns or {}).items():
      # As peft.utils.other.get_pattern_key; peft is a test dependency only.
      if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
        return value
    return default
  alpha = float(lookup(config.get("alpha_pattern"), config.get("lora_alpha", rank)))
  return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _adapter_configs(metadata: Mapping[str, str], where: str) -> dict[str, dict]:
  """{component: PEFT LoraConfig dict} from `lora_adapter_metadata` (empty without it)."""
  raw = metadata.get(lora_names.ADAPTER_METADATA_KEY)
  try:
    adapter = json.loads(raw) if raw else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: metadata {lora_names.ADAPTER_METADATA_KEY} is not JSON ({e})") from e
  configs = {}
  for component, prefix in lora_names.PEFT_PREFIX.items():
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


def _to_lora(modules: Mapping, labels: Mapping, layers: Mapping, other: Mapping, where: str,
             scale: Callable[[str, str, Mapping, int], float],
             skip_unsupported: bool) -> tuple[dict, tuple[str, ...]]:
  """Grouped PyTorch factors -> (LoRA pytree {"down": [in, r], "up": [r, out]}; 1x1
  convolutions [1, 1, in, r], [1, 1, r, out]; skipped).

  `layers`: `lora_layers(base)`; `other`: `unsupported_layers(base)`;
  `scale(component, module, factors, r)`: alpha / r of a module."""
  lora, unsupported = {}, []
  for (component, module), factors in sorted(modules.items()):
    label = labels[(component, module)]
    if module in other.get(component, {}):
      unsupported.append(f"{label} ({other[component][module]})")
      continue
    if module not in layers.get(component, {}):
      raise ValueError(f"{where}: {label}: the base model has no layer {module!r} in its "
                       f"{component}")
    for factor in ("down", "up"):
      if factor not in factors:
        raise ValueError(f"{where}: {label}: the {factor} factor ({FACTOR_NAMES[factor]}) "
                         "is missing")
    layer, kernel_shape = layers[component][module]
    down = _fit(where, *factors["down"], kernel_shape, "down")  # [(1, 1,) in, r]
    up = _fit(where, *factors["up"], kernel_shape, "up")        # [(1, 1,) r, out]
    rank = down.shape[-1]
    if rank != up.shape[-2]:
      raise ValueError(f"{where}: {label}: ranks of the two factors differ "
                       f"({rank} vs {up.shape[-2]})")
    module_scale = scale(component, module, factors, rank)
    if not math.isfinite(module_scale):
      raise ValueError(f"{where}: {label}: alpha / rank is not finite")
    if module_scale != 1.0:
      up = up * np.float32(module_scale)
    lora.setdefault(component, {})[layer] = {"down": down, "up": up}
  if unsupported and not skip_unsupported:
    raise ValueError(
        f"{where}: {len(unsupported)} LoRA module(s) on layers hdb-jax cannot apply (it "
        "applies LoRAs to dense layers and 1x1 convolutions only): " + ", ".join(unsupported)
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
  return _to_lora(modules, labels, lora_layers(base), unsupported_layers(base), where,
                  lambda component, module, _, rank: _peft_scale(
                      configs[component], lora_names.file_spellings(component, module), rank),
                  skip_unsupported)


def from_kohya(tensors: Mapping[str, np.ndarray], base: Mapping[str, Mapping],
               where: str = "", skip_unsupported: bool = False) -> tuple[dict, tuple[str, ...]]:
  """kohya tensors -> (LoRA pytree, skipped). A module without `.alpha` has alpha = r."""
  layers, other = lora_layers(base), unsupported_layers(base)
  names = {}
  for table in (layers, other):
    for component, modules in table.items():
      for module in modules:
        for spelling in lora_names.file_spellings(component, module):
          names[lora_names.KOHYA_PREFIX[component] + spelling.replace(".", "_")] = (component, module)
  modules, labels = _kohya_modules(tensors, names, where)
  return _to_lora(modules, labels, layers, other, where,
                  lambda _, __, factors, rank: _kohya_alpha(where, factors, rank) / rank,
                  skip_unsupported)


def load(path: str, base: Mapping[str, Mapping], skip_unsupported: bool = False) -> Imported:
  """Read a PyTorch LoRA file (any of FORMATS; hdb-jax files too) -> Imported.

  Every module must be a dense layer or 1x1 convolution of `base` (abstract params
  suffice) with fitting shapes and finite values, or (`skip_unsupported`) a layer hdb-jax
  cannot apply a LoRA to, which is left out; otherwise ValueError naming the file and the
  problem.
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
