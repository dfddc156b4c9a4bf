"""Base model export: a diffusers-format folder with PyTorch safetensors weights.

So that a model built or trained here (the mini world, a tiny test model) runs in
PyTorch tools. Needs `torch` (the `[test]` extra, or any PyTorch install).

diffusers 0.39's `from_flax=True` loading fails on its own msgpack files, and its
Flax->PyTorch weight mapper skips the VAE attention renames silently. So each PyTorch
key is mapped with the same PyTorch->Flax renaming rules `models.load` uses (diffusers'
for UNet/VAE, transformers' for CLIP), run in reverse, and every key on both sides must
be used exactly once.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from hdb_jax import files, models
from hdb_jax import params as params_lib


def flax_to_torch_state(torch_state_shapes: dict, flax_params, component: str) -> dict:
  """Flax params -> {PyTorch key: numpy array} for the component's PyTorch model.

  `torch_state_shapes` maps every key of the PyTorch model's state dict to its shape.
  """
  flax_flat = {tuple(k.split(params_lib.SEP)): v
               for k, v in params_lib.flatten(flax_params).items()}
  out, used = {}, set()
  for torch_key, shape in torch_state_shapes.items():
    flax_key = models.torch_key_to_flax(torch_key, shape, flax_flat, component)
    if flax_key not in flax_flat:
      raise ValueError(f"PyTorch weight {torch_key} {tuple(shape)} has no Flax counterpart "
                       f"(looked for {'/'.join(flax_key)})")
    value = np.asarray(flax_flat[flax_key], np.float32)
    if flax_key[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)      # [kh, kw, in, out] -> [out, in, kh, kw]
    elif flax_key[-1] == "kernel":
      value = value.T                          # [in, out] -> [out, in]
    value = value.reshape(shape)              # (1x1 conv attention weights, if any)
    out[torch_key] = np.array(value, np.float32, copy=True, order="C")
    used.add(flax_key)
  unused = sorted("/".join(k) for k in set(flax_flat) - used)
  if unused:
    raise ValueError(f"{len(unused)} Flax weights have no PyTorch counterpart, e.g. {unused[:3]}")
  return out


def _torch_config(model_class, folder: str) -> dict:
  """The Flax model's config without the keys only the Flax class takes (e.g. the UNet's
  `split_head_dim`, `use_memory_efficient_attention`): diffusers would warn about them
  every time the exported folder is loaded."""
  import inspect
  config = model_class.load_config(folder)
  accepted = inspect.signature(model_class.__init__).parameters
  return {k: v for k, v in config.items() if k.startswith("_") or k in accepted}


def export_base(sd: models.StableDiffusion, params, out_dir: str) -> str:
  """Write `out_dir` (atomically): unet/vae/text_encoder as PyTorch safetensors."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextModel

  staging = tempfile.mkdtemp(prefix="hdb-flax-")
  try:
    flax_dir = os.path.join(staging, "flax")
    models.save(sd, params, flax_dir)
    with files.atomic_dir(out_dir) as tmp:
      for name, model in (
          ("unet", UNet2DConditionModel.from_config(
              _torch_config(UNet2DConditionModel, os.path.join(flax_dir, "unet")))),
          ("vae", AutoencoderKL.from_config(
              _torch_config(AutoencoderKL, os.path.join(flax_dir, "vae")))),
          ("text_encoder", CLIPTextModel(CLIPTextModel.config_class.from_pretrained(
              os.path.join(flax_dir, "text_encoder"))))):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = flax_to_torch_state(shapes, params[name], name)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        model.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
      for name in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(flax_dir, name), os.path.join(tmp, name))
      shutil.copy(os.path.join(flax_dir, "model_index.json"), tmp)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out_dir
