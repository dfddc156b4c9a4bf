"""Write one model component as a PyTorch model folder, without torch.

`config.json` plus the weights as safetensors (float32, metadata `format: pt`) under the
file name diffusers (`diffusion_pytorch_model.safetensors`) or transformers
(`model.safetensors`) look for, keyed by `torch_keys.flax_to_torch`: the folder loads
with `UNet2DConditionModel.from_pretrained(folder)`, `AutoencoderKL.from_pretrained`,
`CLIPTextModel.from_pretrained`, ... The config dict is the component's config.json as
PyTorch reads it (our configs' `to_dict()`); it is written unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from hdb_jax.nn import torch_keys

WEIGHTS_FILES = {"unet": "diffusion_pytorch_model.safetensors",
                 "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "vision_encoder": "model.safetensors",
                 "clip": "model.safetensors", "vit": "model.safetensors"}


def write_torch_component(folder: str, component: str, flax_params: Mapping,
                          config_dict: Mapping) -> str:
  """Write `folder/config.json` and `folder/<weights file>`; returns the weights path.
  The folder is created if needed; existing files of the same names are replaced."""
  import safetensors.numpy  # numpy only: no torch needed
  if component not in WEIGHTS_FILES:
    raise ValueError(f"unknown component {component!r} (known: {', '.join(WEIGHTS_FILES)})")
  state = torch_keys.flax_to_torch(component, flax_params)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(config_dict), f, indent=2, sort_keys=True)
    f.write("\n")
  weights_path = os.path.join(folder, WEIGHTS_FILES[component])
  safetensors.numpy.save_file(state, weights_path, metadata={"format": "pt"})
  return weights_path
