"""PyTorch LoRA files <-> hdb-jax LoRA pytrees (hdb_jax/lora.py): names and export.

Imports (these two formats, diffusers' own and its older attention-processor format, and
LoRAs on layers hdb-jax cannot apply) are in hdb_jax/convert_import.py; `load` here
calls it.

Exports write two PyTorch formats, both safetensors with float32 weights and `format: pt`:

- PEFT / diffusers (`pipe.load_lora_weights(file)`):
      unet.<module>.lora_A.weight [r, in]    unet.<module>.lora_B.weight [out, r]
      text_encoder.text_model.encoder.layers.<i>.self_attn.q_proj.lora_A.weight ...
  plus `lora_adapter_metadata` (JSON: "unet.r", "unet.lora_alpha", "unet.target_modules",
  rank/alpha patterns, the same under "text_encoder."), which diffusers writes and reads.
  Keys name the text encoder's layers as its checkpoints do (`text_model.` root);
  target modules and patterns name them as transformers 5's modules (no root; see below).
- kohya (A1111, ComfyUI, diffusers' kohya conversion):
      lora_unet_<module with _>.lora_down.weight [r, in], .lora_up.weight [out, r], .alpha
      lora_te_text_model_encoder_layers_<i>_self_attn_q_proj.lora_down.weight ...
  and `ss_network_dim`, `ss_network_alpha`, `ss_network_module`, `ss_base_model_version`.
  One alpha for the whole file (diffusers' kohya loader expects that).

Both give `dW_torch [out, in] = scale * B @ A` with `scale = alpha / r`; hdb-jax keeps
`dW [in, out] = down @ up` (Flax kernels are the transposes), so `A = down.T`,
`B = scale^-1 * up.T`. Exports set alpha = r wherever they can (scale 1, factors stored
unchanged), so import(export(x)) == x exactly.

1x1 convolutions (`proj_in` / `proj_out` of SD1.x's transformer blocks, `conv_shortcut`;
only imports make LoRAs on them, hdb_jax/lora.py) are written as PyTorch's convolution
LoRAs: `A [r, in, 1, 1]` (a 1x1 convolution in -> r) and `B [out, r, 1, 1]`, the same keys
and names as dense layers. hdb-jax's factors `down [1, 1, in, r]`, `up [1, 1, r, out]` are
in Flax kernel layout; `torch_layout` / `flax_layout` convert between the two.

Module names. Flax flattens PyTorch ModuleLists into `<list>_<i>` segments
(`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0` is
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`), while names such
as `time_embedding/linear_1` keep their underscore, so the PyTorch name is recovered
from the list names of diffusers' UNet (`torch_module`). The CLIP text encoder has two
spellings: its checkpoint files, transformers 4's modules, kohya names and ComfyUI say
`text_model.encoder.layers.0.self_attn.q_proj`; transformers 5's CLIPTextModel has no
`text_model` module, so its modules, which PEFT targets, are `encoder.layers.0...`
(`module_name`). Files are written with the rooted keys (transformers 4 loads only
those; transformers 5 and diffusers >= 0.42 map them) and the unrooted target names
(PEFT matches a target as a suffix of the module name: both module trees). Imports read
both spellings. Exports need no base model; imports check every name against the base
model with the key map base models load with (hdb_jax/nn/torch_keys.py), so the two
directions cannot drift apart silently.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from typing import Mapping

import numpy as np

from hdb_jax import convert_import, files
from hdb_jax import lora as lora_lib
# The names shared with the import side (hdb_jax/lora_names.py), importable from here too.
from hdb_jax.lora_names import (  # noqa: F401
    ADAPTER_METADATA_KEY, FILE_ROOTS, FORMATS, KOHYA_PREFIX, PEFT_PREFIX, UNET_MODULE_LISTS,
    file_spellings, flax_layout, kohya_name, module_name, torch_kernel_names, torch_layout,
    torch_module, torch_names)


# ------------------------------------------------------------------------------------
# Export

def _common_rank(layer_ranks: Mapping[str, int]) -> int:
  return collections.Counter(layer_ranks.values()).most_common(1)[0][0]


def to_peft(lora: Mapping) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """LoRA pytree -> (PEFT/diffusers tensors, safetensors metadata). No base model needed.

  Keys use the files' names (`torch_module`), `target_modules` and the patterns the
  modules' names (`module_name`). `lora_alpha` = `r` for every layer (rank_pattern =
  alpha_pattern where ranks differ), so PEFT's scale is 1 and the factors are stored as
  they are.
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
      tensors[f"{prefix}.{module}.lora_A.weight"] = torch_layout(f["down"])  # [r, in(, 1, 1)]
      tensors[f"{prefix}.{module}.lora_B.weight"] = torch_layout(f["up"])    # [out, r(, 1, 1)]
      layer_ranks[module_name(component, module)] = int(np.shape(f["down"])[-1])
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
  layer_ranks = {(c, layer): r for c, layers in lora_lib.ranks(lora).items()
                 for layer, r in layers.items()}
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
      tensors[f"{name}.lora_down.weight"] = torch_layout(f["down"])  # [r, in(, 1, 1)]
      tensors[f"{name}.lora_up.weight"] = torch_layout(up)           # [out, r(, 1, 1)]
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
# Import (hdb_jax/convert_import.py)

def load(path: str, base: Mapping[str, Mapping],
         skip_unsupported: bool = False) -> tuple[dict, str]:
  """Read a PyTorch LoRA file (PEFT, diffusers, diffusers-old, kohya; hdb-jax files too)
  -> (LoRA pytree, format). See `convert_import.load`, which also returns the modules
  `skip_unsupported` left out; here their number is logged as a warning."""
  imported = convert_import.load(path, base, skip_unsupported)
  if imported.skipped:
    logging.warning("%s: skipped %d LoRA module(s) on layers hdb-jax cannot apply: %s", path,
                    len(imported.skipped), ", ".join(imported.skipped))
  return imported.lora, imported.format
