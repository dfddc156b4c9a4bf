"""The names and layouts PyTorch LoRA files use for hdb-jax's layers: shared by the export
(hdb_jax/convert.py) and the import (hdb_jax/convert_import.py) side.

A Flax layer path such as `down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q` is
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` in diffusers' UNet; kohya
files join the same name with underscores after `lora_unet_` / `lora_te_`. LoRA factors
are stored in Flax kernel layout here (`down [in, r]`, `up [r, out]`) and in PyTorch's
(`A [r, in]`, `B [out, r]`) in files.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

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
# Root module that checkpoint and LoRA files put before these components' layer names and
# that transformers 5's modules lack (CLIPTextModel: `text_model.encoder.layers.<i>...`).
FILE_ROOTS = {"text_encoder": "text_model."}



# ------------------------------------------------------------------------------------
# Names

def torch_module(component: str, layer: str) -> str:
  """Flax layer path -> the PyTorch name LoRA files and checkpoints give the layer (its
  base weight's key without `.weight`): `.../attn1/to_out_0` -> `....attn1.to_out.0`,
  `text_model/encoder/layers/0/self_attn/q_proj` -> `text_model.encoder.layers.0.self_attn.q_proj`
  (`module_name` drops the `text_model.` root that transformers 5's modules lack)."""
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


def module_name(component: str, name: str) -> str:
  """A layer's PyTorch name as files spell it (`torch_module`; for the text encoder with or
  without the `text_model.` root) -> its module name in current diffusers / transformers
  (`named_modules()`, what PEFT targets): `encoder.layers.0.self_attn.q_proj`."""
  root = FILE_ROOTS.get(component)
  return name.removeprefix(root) if root else name


def file_spellings(component: str, module: str) -> tuple[str, ...]:
  """A module name (`module_name`) -> every name files give it, the rooted first:
  ("text_model.encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.q_proj")."""
  root = FILE_ROOTS.get(component)
  return (root + module, module) if root else (module,)


def kohya_name(component: str, layer: str) -> str:
  """Flax layer path -> kohya LoRA name, e.g. `lora_te_text_model_encoder_layers_0_self_attn_q_proj`."""
  return KOHYA_PREFIX[component] + torch_module(component, layer).replace(".", "_")


def torch_kernel_names(base: Mapping[str, Mapping]
                       ) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
  """{component: {PyTorch module: (Flax layer, Flax kernel shape)}} for every layer of
  `base` with a kernel: dense [in, out] and convolutions [kh, kw, in, out]. Modules are
  named as in current diffusers / transformers (`module_name`: the text encoder's
  `encoder.layers.0.self_attn.q_proj`).

  `base` may be abstract params. Each name is checked against the key map base models
  load and export with (`hdb_jax/nn/torch_keys.py`).
  """
  from hdb_jax.nn import torch_keys
  table = {}
  for component in PEFT_PREFIX:
    if component not in base:
      continue
    table[component] = {}
    for path, leaf in params_lib.flatten(base[component]).items():
      if not path.endswith(params_lib.SEP + "kernel"):
        continue
      layer = path[: -len(params_lib.SEP + "kernel")]
      module = torch_module(component, layer)
      shape = tuple(int(d) for d in leaf.shape)
      torch_key = torch_keys.flax_to_torch_key(component, tuple(path.split(params_lib.SEP)))
      if torch_key != module + ".weight":
        raise RuntimeError(f"hdb-jax names {component}/{layer} {module!r} in PyTorch LoRAs, "
                           f"but its base weight is {torch_key!r}")
      table[component][module_name(component, module)] = (layer, shape)
  return table


def torch_names(base: Mapping[str, Mapping]) -> dict[str, dict[str, tuple[str, tuple[int, int]]]]:
  """{component: {PyTorch module: (Flax layer, (in, out))}} for every dense layer of `base`
  (the `torch.nn.Linear` modules). Names checked as in `torch_kernel_names`."""
  return {component: {module: (layer, shape) for module, (layer, shape) in modules.items()
                      if len(shape) == 2}
          for component, modules in torch_kernel_names(base).items()}


def torch_layout(factor: np.ndarray) -> np.ndarray:
  """A LoRA factor in Flax kernel layout [..., a, b] -> PyTorch's [b, a, ...] (float32):
  down [in, r] -> A [r, in]; down [1, 1, in, r] -> A [r, in, 1, 1] (likewise up -> B)."""
  factor = np.asarray(factor, np.float32)
  return np.ascontiguousarray(np.transpose(factor, (factor.ndim - 1, factor.ndim - 2,
                                                    *range(factor.ndim - 2))))


def flax_layout(factor: np.ndarray) -> np.ndarray:
  """Inverse of `torch_layout`: PyTorch [b, a, ...] -> Flax [..., a, b] (float32)."""
  factor = np.asarray(factor, np.float32)
  return np.ascontiguousarray(np.transpose(factor, (*range(2, factor.ndim), 1, 0)))


