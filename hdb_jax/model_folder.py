"""The diffusers folder layout of a Stable Diffusion model, and reading its Flax weights
without importing any model code (the warm path of `hdb personalize` needs only the
arrays: its programs are stored, `hdb_jax/programs.py`). `hdb_jax/models.py` builds,
checks and converts; this module only knows file names."""

from __future__ import annotations

import os

COMPONENTS = ("unet", "vae", "text_encoder")
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FLAX_WEIGHTS = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
                "text_encoder": "flax_model.msgpack"}
TORCH_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors",
                 "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors"}
# diffusers' fp16 "variant" files (`variant="fp16"` downloads): the same names with ".fp16"
# before the extension; read and cast to the requested dtype when no full-precision file is there.
FP16_TORCH_WEIGHTS = {c: name.replace(".safetensors", ".fp16.safetensors")
                      for c, name in TORCH_WEIGHTS.items()}
# PyTorch pickles: unpickling can run arbitrary code, so they are read only when allowed.
PICKLE_WEIGHTS = {"unet": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
                  "vae": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
                  "text_encoder": ("pytorch_model.bin", "pytorch_model.fp16.bin")}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}


def read_config_texts(path: str) -> dict[str, str]:
  """The folder's config files as text ({subfolder: text}; "" where missing): they decide
  the architecture, so they are part of a stored program's key."""
  texts = {}
  for sub, name in CONFIG_FILES.items():
    try:
      with open(os.path.join(path, sub, name)) as f:
        texts[sub] = f.read()
    except OSError:
      texts[sub] = ""
  return texts


def read_flax_params(path: str) -> dict | None:
  """{component: params} from the folder's Flax msgpack files, or None when a component
  has none (PyTorch weights need converting: `models.load`). Raises like msgpack on a
  damaged file; callers fall back to `models.load`, which names the file."""
  from flax import serialization  # the msgpack reader only, not the Flax modules
  files = {c: os.path.join(path, c, FLAX_WEIGHTS[c]) for c in COMPONENTS}
  if not all(os.path.exists(f) for f in files.values()):
    return None
  params = {}
  for component, file in files.items():
    with open(file, "rb") as f:
      params[component] = serialization.msgpack_restore(f.read())
  return params
