"""The paper's metrics on real images: CLIP-I, CLIP-T and DINO (Face Rec: `faces.py`).

    encoders = metrics.load_encoders(clip_path, dino_path)          # local folders
    metrics.clip_image_similarity(encoders, reference, samples)      # CLIP-I   [N]
    metrics.clip_text_similarity(encoders, samples, prompts, "sks")  # CLIP-T   [N]
    metrics.dino_similarity(encoders, reference, samples)            # DINO     [N]

  CLIP-I   cosine similarity of the CLIP image embeddings of a sample and the subject's
           reference photo (averaged over the references when there are several)
  CLIP-T   cosine similarity of a sample's CLIP image embedding and the CLIP text
           embedding of its prompt, the identifier token removed (as DreamBooth does: the
           text encoder does not know the subject's word)
  DINO     cosine similarity of the CLS embeddings of a self-supervised ViT (DINO) of a
           sample and the reference: unlike CLIP's, they tell apart subjects of a class

Images: uint8 [..., H, W, 3] in [0, 255], or floats in [-1, 1] (the sampler's output).
Each encoder center-crops them to a square, resizes to its own size (antialiased) and
normalizes by its mean and std (`models_eval.ImagePreprocessing`), all inside one jitted
function per encoder; batches are padded to `batch_size`, so one program serves any N.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import models_eval


@dataclasses.dataclass(frozen=True, eq=False)
class Encoders:
  """The metrics' encoders and their params; either may be None (its metrics are then
  not computed)."""
  clip: models_eval.Clip | None
  clip_params: Any
  dino: models_eval.Dino | None
  dino_params: Any
  batch_size: int = 16


def load_encoders(clip_path: str, dino_path: str, batch_size: int = 16,
                  dtype: str = "float32") -> Encoders:
  """Both encoders from their local folders (an empty path: that encoder left out)."""
  clip, clip_params = models_eval.load_clip(clip_path, dtype) if clip_path else (None, None)
  dino, dino_params = models_eval.load_dino(dino_path, dtype) if dino_path else (None, None)
  return Encoders(clip, clip_params, dino, dino_params, batch_size)


def to_unit_range(images) -> jax.Array:
  """uint8 in [0, 255] or floats in [-1, 1] -> float32 in [0, 1], same shape."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def preprocess(images, preprocessing: models_eval.ImagePreprocessing) -> jax.Array:
  """Images [B, H, W, 3] (uint8, or floats in [-1, 1]) -> the encoder's input
  [B, S, S, 3]: center square crop, resize to S (antialiased), (x - mean) / std."""
  x = to_unit_range(images)
  height, width = x.shape[1:3]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  x = x[:, top:top + side, left:left + side]
  size = preprocessing.size
  if side != size:
    x = jax.image.resize(x, (x.shape[0], size, size, 3), preprocessing.resample,
                         antialias=True)
  return (x - jnp.array(preprocessing.mean)) / jnp.array(preprocessing.std)


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _clip_images(clip, params, images):
  return _unit(clip.image_features(params, preprocess(images, clip.preprocessing)))


@functools.partial(jax.jit, static_argnums=0)
def _clip_texts(clip, params, input_ids, attention_mask):
  return _unit(clip.text_features(params, input_ids, attention_mask))


@functools.partial(jax.jit, static_argnums=0)
def _dino_images(dino, params, images):
  return _unit(dino.cls_features(params, preprocess(images, dino.preprocessing)))


def _batched(embed, inputs: list[np.ndarray], batch_size: int) -> np.ndarray:
  """embed(*chunks) over the leading axis of `inputs`, in chunks of min(batch_size, N),
  the last one padded by repeating its final row: one compiled shape per N-class."""
  n = len(inputs[0])
  size = max(1, min(batch_size, n))
  out = []
  for start in range(0, n, size):
    chunks = [x[start:start + size] for x in inputs]
    short = size - len(chunks[0])
    if short:
      chunks = [np.concatenate([c, np.repeat(c[-1:], short, 0)]) for c in chunks]
    out.append(np.asarray(embed(*chunks))[:size - short])
  return np.concatenate(out)


def _as_batch(images) -> np.ndarray:
  images = np.asarray(images)
  return images[None] if images.ndim == 3 else images


def clip_image_embeddings(encoders: Encoders, images) -> np.ndarray:
  """Images [N, H, W, 3] (or one [H, W, 3]) -> unit CLIP image embeddings [N, D]."""
  embed = functools.partial(_clip_images, encoders.clip, encoders.clip_params)
  return _batched(embed, [_as_batch(images)], encoders.batch_size)


def clip_text_embeddings(encoders: Encoders, prompts: list[str]) -> np.ndarray:
  """Prompts [N] -> unit CLIP text embeddings [N, D]."""
  tokens = encoders.clip.tokenize(prompts)
  embed = functools.partial(_clip_texts, encoders.clip, encoders.clip_params)
  return _batched(embed, [tokens["input_ids"], tokens["attention_mask"]], encoders.batch_size)


def dino_embeddings(encoders: Encoders, images) -> np.ndarray:
  """Images [N, H, W, 3] (or one [H, W, 3]) -> unit DINO CLS embeddings [N, D]."""
  embed = functools.partial(_dino_images, encoders.dino, encoders.dino_params)
  return _batched(embed, [_as_batch(images)], encoders.batch_size)


def remove_identifier(prompt: str, identifier: str) -> str:
  """The prompt without the identifier word: "a photo of sks person" -> "a photo of person"."""
  kept = [w for w in prompt.split() if re.sub(r"\W", "", w) != identifier]
  return " ".join(kept)


def clip_image_similarity(encoders: Encoders, reference, samples) -> np.ndarray:
  """CLIP-I: reference [H, W, 3] or references [R, H, W, 3], samples [N, H', W', 3] ->
  float32 [N], each sample's mean cosine similarity to the references (in [-1, 1])."""
  anchor = clip_image_embeddings(encoders, reference)                  # [R, D]
  return (clip_image_embeddings(encoders, samples) @ anchor.T).mean(1)


def clip_text_similarity(encoders: Encoders, samples, prompts: list[str],
                         identifier: str | None = None) -> np.ndarray:
  """CLIP-T: samples [N, H, W, 3] and their prompts [N] -> float32 [N], the cosine
  similarity of each sample and its prompt (without `identifier`, when given)."""
  if identifier:
    prompts = [remove_identifier(p, identifier) for p in prompts]
  images = clip_image_embeddings(encoders, samples)
  if len(prompts) != len(images):
    raise ValueError(f"clip_text_similarity: {len(images)} samples, {len(prompts)} prompts")
  return (images * clip_text_embeddings(encoders, prompts)).sum(1)


def dino_similarity(encoders: Encoders, reference, samples) -> np.ndarray:
  """DINO: reference [H, W, 3] or references [R, H, W, 3], samples [N, H', W', 3] ->
  float32 [N], each sample's mean cosine similarity of DINO CLS embeddings to the
  references."""
  anchor = dino_embeddings(encoders, reference)
  return (dino_embeddings(encoders, samples) @ anchor.T).mean(1)
