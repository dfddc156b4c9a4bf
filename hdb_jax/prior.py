"""A prior term for fast finetuning: class images the frozen base made, cached per base.

Finetuning on one photo drifts the class prompt toward the subject ("a face" starts to
look like the person: docs/results.md). With `config.personalize.prior_images` > 0 every
finetuning step also draws `batch_size` examples from that many images the base itself
made of `prior_prompt` ("a {class_name}"), with loss weight `prior_weight` against the
photo's 1: DreamBooth's class-specific prior preservation, inside the personalization's
few steps. The paper has no such term.

The images are made once per base and settings with the personalization's own programs
(its sampler with a zero LoRA, its VAE encoder), and their latent distributions cached in
`<cache>/prior/<key>.npz` (`personalize.cache_dirs`), so a personalization pays for them
only the first time. Without a cache folder they are made once per loaded Personalizer.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from hdb_jax import files, programs


def enabled(cfg) -> bool:
  return int(cfg.get("prior_images", 0)) > 0


def prompt_of(cfg, token: str, class_name: str) -> str:
  return cfg.get("prior_prompt", "a {class_name}").format(token=token, class_name=class_name)


def key_of(fingerprint: str, cfg, class_ids, image_size: int) -> str:
  """Everything the class images depend on: the base, the prompt's tokens, how many, and
  the sampler's settings."""
  return programs.key_of("prior", fingerprint, list(map(int, class_ids)),
                         int(cfg.prior_images), int(cfg.seed), int(cfg.sample_steps),
                         float(cfg.guidance_scale), image_size)


def make_latents(generate, encode, frozen, zero_lora, class_ids, uncond_ids, count: int,
                 rows: int, views: int, seed: int, guidance: float) -> dict:
  """`count` samples of the class prompt by the base (`generate` with `zero_lora`, `rows`
  per call), VAE-encoded `views` at a time -> {"mean", "std"}: [count, C, h, w] each."""
  key = jax.random.key(seed + 1)  # other noise than the personalization's samples
  images = []
  for chunk in range(-(-count // rows)):
    cond = np.repeat(np.asarray([class_ids], np.int32), rows, 0)
    uncond = np.repeat(np.asarray([uncond_ids], np.int32), rows, 0)
    images.append(np.asarray(generate(frozen, zero_lora, cond, uncond,
                                      jax.random.fold_in(key, chunk), np.float32(guidance))))
  images = np.concatenate(images)[:count]                              # [count, S, S, 3]
  means, stds = [], []
  for start in range(0, count, views):
    chunk = images[start:start + views]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], views - len(chunk), 0)])
    mean, std = encode(frozen["vae"], padded)
    means.append(np.asarray(mean)[:len(chunk)])
    stds.append(np.asarray(std)[:len(chunk)])
  return {"mean": np.concatenate(means), "std": np.concatenate(stds)}


def cached_latents(folder: str | None, key: str, make) -> dict:
  """`make()`'s latents, read from `folder`/<key>.npz when there (written atomically the
  first time); `folder` None: made each time. An unreadable file is made again."""
  if not folder:
    return make()
  path = os.path.join(folder, f"{key}.npz")
  try:
    with np.load(path) as stored:
      return {"mean": stored["mean"], "std": stored["std"]}
  except (OSError, ValueError, KeyError):
    pass
  latents = make()
  with files.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **latents)
  return latents
