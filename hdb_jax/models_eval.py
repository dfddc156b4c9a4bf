"""The evaluation's pretrained encoders: CLIP (CLIP-I, CLIP-T) and a DINO ViT, from local
folders.

The modules are hdb-jax's own (`hdb_jax/nn/clip.py`, `hdb_jax/nn/vit.py`), with the
parameter trees transformers' Flax classes had; loading rules and errors are shared with
`models.py`. Only local folders, no model hub:

  CLIP   config.json (model_type "clip": text_config + vision_config), the weights of a
         CLIPModel as flax_model.msgpack or model.safetensors, and its tokenizer
         (vocab.json + merges.txt) beside them: e.g. a local copy of
         openai/clip-vit-base-patch32 or openai/clip-vit-large-patch14
  DINO   config.json (model_type "vit") and the weights of a ViTModel as
         flax_model.msgpack or model.safetensors: e.g. facebook/dino-vits16

Either may hold preprocessor_config.json: its image_mean, image_std and resample are
used; without it CLIP's, respectively ImageNet's, mean and std. Images always go in at
the model's own `image_size` (its position embeddings are fixed).

    clip, clip_params = models_eval.load_clip("/data/clip-vit-large-patch14")
    dino, dino_params = models_eval.load_dino("/data/dino-vits16")
"""

from __future__ import annotations

import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import models
from hdb_jax.models import CLIP_MEAN, CLIP_STD, ModelLoadError
from hdb_jax.nn import clip, torch_keys, vit
from hdb_jax.nn.tokenizer import CLIPTokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = models.VISION_WEIGHTS  # {"flax": "flax_model.msgpack", "torch": "model.safetensors"}
# PIL's resampling codes (preprocessor_config.json "resample") -> jax.image.resize methods
RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "bilinear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """How an encoder wants its images: [size, size, 3], in [0, 1] then (x - mean) / std."""
  size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resample: str  # a jax.image.resize method


@dataclasses.dataclass(frozen=True, eq=False)
class Clip:
  """A CLIPModel without weights (params live outside), its tokenizer and preprocessing."""
  model: clip.CLIPModel
  tokenizer: CLIPTokenizer
  preprocessing: ImagePreprocessing

  @property
  def max_length(self) -> int:
    return min(self.tokenizer.model_max_length,
               self.model.config.text_config.max_position_embeddings)

  def tokenize(self, prompts: list[str]) -> dict:
    """Prompts -> {"input_ids", "attention_mask"}: int32 [B, max_length] each, on the host."""
    out = self.tokenizer(list(prompts), max_length=self.max_length)
    return {"input_ids": out["input_ids"].astype(np.int32),
            "attention_mask": out["attention_mask"].astype(np.int32)}

  def image_features(self, params, pixels):
    """Preprocessed images [B, S, S, 3] -> projected image embeddings [B, D] (not unit)."""
    return self.model.apply({"params": params}, pixels, method=self.model.image_features)

  def text_features(self, params, input_ids, attention_mask):
    """Token ids and mask [B, L] -> projected text embeddings [B, D] (not unit)."""
    return self.model.apply({"params": params}, input_ids, attention_mask,
                            method=self.model.text_features)


@dataclasses.dataclass(frozen=True, eq=False)
class Dino:
  """A ViTModel (no pooler) without weights, and its preprocessing."""
  model: vit.ViTModel
  preprocessing: ImagePreprocessing

  def cls_features(self, params, pixels):
    """Preprocessed images [B, S, S, 3] -> the CLS token's last hidden state [B, D]
    (after the final layer norm: DINO's image embedding)."""
    return self.model.apply({"params": params}, pixels)[:, 0]


# ------------------------------------------------------------------------------------
# Loading

def _folder(path: str, what: str) -> str:
  path = os.path.abspath(os.path.expanduser(path or ""))
  if not os.path.isdir(path):
    raise ModelLoadError(f"{path}: not a folder (expected a local {what} folder; model hub "
                         "ids are not supported)")
  return path


def read_preprocessing(folder: str, size: int, mean, std, resample: str) -> ImagePreprocessing:
  """The encoder's preprocessing at `size`: mean, std and resampling from the folder's
  preprocessor_config.json when it has one, else the given defaults."""
  path = os.path.join(folder, "preprocessor_config.json")
  found = models._read_json(path) if os.path.exists(path) else {}
  try:
    mean = tuple(float(v) for v in found.get("image_mean", mean))
    std = tuple(float(v) for v in found.get("image_std", std))
    resample = RESAMPLE.get(found.get("resample"), resample)
  except (TypeError, ValueError) as e:
    raise ModelLoadError(f"{path}: image_mean / image_std are not numbers ({e})") from e
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ModelLoadError(f"{path}: image_mean and image_std need 3 values, std > 0")
  return ImagePreprocessing(int(size), mean, std, resample)


def _read_weights(folder: str, expected: dict, component: str, prefix: str,
                  what: str) -> dict:
  """The folder's weights (Flax msgpack, else PyTorch safetensors) fitted to `expected`.
  A head model's Flax weights under `prefix` (e.g. "vit") are unwrapped; PyTorch keys are
  mapped by our key map (`torch_keys`: for a ViT, a "vit." prefix, pooler and classifier
  are dropped)."""
  flax_file = os.path.join(folder, WEIGHTS["flax"])
  torch_file = os.path.join(folder, WEIGHTS["torch"])
  if os.path.exists(flax_file):
    try:
      with open(flax_file, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ModelLoadError(f"{flax_file}: not a readable Flax msgpack file ({e})") from e
    if prefix in tree and not set(expected) & set(tree):  # a head model's base
      tree = tree[prefix]
    tree = {k: v for k, v in tree.items() if k in expected or k not in ("pooler", "classifier")}
  elif os.path.exists(torch_file):
    state = models._read_safetensors(torch_file)
    try:
      tree = torch_keys.torch_to_flax(component, state, expected)
    except ValueError as e:
      raise ModelLoadError(f"{torch_file}: weights do not fit the {what} config ({e})") from e
  else:
    raise ModelLoadError(f"{folder}: no weights ({WEIGHTS['flax']} or {WEIGHTS['torch']}; "
                         "pytorch_model.bin is not read: convert it to safetensors)")
  return models._check_fits(what, folder, tree, expected)


def _config(folder: str, model_type: str, config_class, example: str):
  path = os.path.join(folder, "config.json")
  found = models._read_json(path)
  if found.get("model_type", model_type) != model_type:
    raise ModelLoadError(f"{path}: model_type {found.get('model_type')!r}, expected "
                         f"{model_type!r} ({example})")
  try:
    return config_class.from_dict(found)
  except Exception as e:
    raise ModelLoadError(f"{path}: not a {model_type} config ({e})") from e


def load_clip(path: str, dtype: str = "float32") -> tuple[Clip, dict]:
  """A local CLIP folder -> (Clip, its params)."""
  folder = _folder(path, "CLIP model (a CLIPModel with its tokenizer)")
  config = _config(folder, "clip", clip.CLIPConfig,
                   "a CLIPModel, e.g. openai/clip-vit-base-patch32")
  tokenizer = models._load_tokenizer(folder)
  model = clip.CLIPModel(config, jnp.dtype(dtype))
  expected = clip.param_shapes(model)
  params = _read_weights(folder, expected, "clip", "clip", "CLIP")
  preprocessing = read_preprocessing(folder, config.vision_config.image_size, CLIP_MEAN,
                                     CLIP_STD, "bicubic")
  return Clip(model, tokenizer, preprocessing), params


def load_dino(path: str, dtype: str = "float32") -> tuple[Dino, dict]:
  """A local DINO (ViT) folder -> (Dino, its params). A pooler or classifier in the
  weights is ignored: the metric is the CLS token's embedding."""
  folder = _folder(path, "DINO ViT model (a ViTModel)")
  config = _config(folder, "vit", vit.ViTConfig, "a ViTModel, e.g. facebook/dino-vits16")
  model = vit.ViTModel(config, jnp.dtype(dtype))
  expected = vit.param_shapes(model)
  params = _read_weights(folder, expected, "vit", "vit", "DINO ViT")
  preprocessing = read_preprocessing(folder, config.image_size, IMAGENET_MEAN, IMAGENET_STD,
                                     "bilinear")
  return Dino(model, preprocessing), params
