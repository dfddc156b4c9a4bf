"""Base model export: a diffusers-format folder with PyTorch safetensors weights.

So that a model built or trained here (the mini world, a tiny test model) runs in
PyTorch tools. Needs no torch: each component's weights are renamed and transposed by
our key map (`hdb_jax/nn/torch_keys.py`, the one `models.load` reads PyTorch folders
with) and written with safetensors, beside the config files PyTorch diffusers and
transformers read (`StableDiffusionPipeline.from_pretrained(folder)` loads it).
"""

from __future__ import annotations

import json
import os

from hdb_jax import files, models
from hdb_jax.nn import export


def export_base(sd: models.StableDiffusion, params, out_dir: str) -> str:
  """Write `out_dir` (atomically): unet/vae/text_encoder as PyTorch safetensors, the
  tokenizer, the scheduler config and model_index.json."""
  configs = models.config_dicts(sd)
  with files.atomic_dir(out_dir) as tmp:
    for component in models.COMPONENTS:
      export.write_torch_component(os.path.join(tmp, component), component,
                                   params[component], configs[component])
    sd.tokenizer.save(os.path.join(tmp, "tokenizer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump(configs["scheduler"], f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
      json.dump(models.MODEL_INDEX, f, indent=2)
  return out_dir
