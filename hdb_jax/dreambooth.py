"""LiDB DreamBooth for one subject: data preparation and a jitted optax train step.

The frozen base params and the LiDB aux matrices are arguments of the step (never
closed over: XLA would constant-fold them), the LiDB train pytree is what optax updates.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdb_jax import diffusion, lidb


def encode_subject(sd, vae_params, images: np.ndarray, hflip: bool) -> dict:
  """VAE latent distribution of the subject images [N, H, W, 3] (and their mirror images).

  Encoded once: the VAE is frozen. Returns {"mean", "std"}: [M, C, h, w] each, M = N or 2N.
  """
  if hflip:
    images = np.concatenate([images, images[:, :, ::-1]])
  mean, std = jax.jit(sd.encode_images)(vae_params, jnp.asarray(images))
  return {"mean": mean, "std": std}


def subject_views(photo: np.ndarray, hflip: bool, crops: int = 0, min_crop: float = 0.85,
                  seed: int = 0) -> np.ndarray:
  """The photo [S, S, 3] as training views [V, S, S, 3]: itself, its mirror image (with
  `hflip`), and `crops` random crops of each (a square of side U(min_crop, 1) x S at a
  random place, resized back to S: small shifts and zooms), V = (1 + hflip)(1 + crops).
  Deterministic for a `seed`."""
  bases = [photo, photo[:, ::-1]] if hflip else [photo]
  if not crops:
    return np.stack(bases).astype(np.float32)
  from PIL import Image  # resampling with a sub-pixel box: PIL's resize does it exactly
  size = photo.shape[0]
  rng = np.random.default_rng(seed)
  views = []
  for base in bases:
    views.append(base)
    for _ in range(crops):
      side = rng.uniform(min_crop, 1.0) * size
      left, top = rng.uniform(0.0, size - side, 2)
      box = (left, top, left + side, top + side)
      views.append(np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(base[..., c],
                                                                             np.float32))
                                        .resize((size, size), Image.BICUBIC, box=box))
                             for c in range(base.shape[-1])], -1))
  return np.stack(views).astype(np.float32)


def face_weights(shape: tuple[int, int], ellipse, background_weight: float) -> np.ndarray:
  """Per-position loss weights [h, w] of an aligned face crop on its latent grid: 1 inside
  the ellipse (cx, cy, rx, ry, in units of the side, y down) where the face of an aligned
  crop lies, `background_weight` outside. The photo's own face mask is not known (a
  user's photo has none), the crop's geometry is: the face is centred. Symmetric about
  the vertical axis when cx = 0.5, so a mirrored view takes the same weights."""
  cx, cy, rx, ry = (float(v) for v in ellipse)
  h, w = shape
  y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
  return np.where(inside, 1.0, float(background_weight)).astype(np.float32)


def make_pool(latents: Mapping[str, jax.Array], input_ids: np.ndarray, weight: float,
              pixel_weights: np.ndarray | None = None) -> dict:
  """A pool of examples to draw batches from: latents, prompt ids [M, L], loss weight [M],
  and with `pixel_weights` ([h, w] for all, or [M, h, w]) a weighted mean over the latent
  positions in place of the plain mean (`diffusion.loss_given_noise`). Pools drawn
  together all have pixel weights or none."""
  count = latents["mean"].shape[0]
  ids = np.broadcast_to(np.asarray(input_ids, np.int32).reshape(-1, input_ids.shape[-1]),
                        (count, input_ids.shape[-1]))
  pool = {"mean": latents["mean"], "std": latents["std"], "input_ids": jnp.asarray(ids),
          "weight": jnp.full((count,), weight, jnp.float32)}
  if pixel_weights is not None:
    grid = tuple(latents["mean"].shape[-2:])
    pool["pixel_weights"] = jnp.broadcast_to(jnp.asarray(pixel_weights, jnp.float32),
                                             (count,) + grid)
  return pool


def draw(pool: Mapping[str, jax.Array], rng, batch_size: int) -> dict:
  """`batch_size` examples drawn uniformly from a pool (`make_pool`)."""
  index = jax.random.randint(rng, (batch_size,), 0, pool["mean"].shape[0])
  return jax.tree_util.tree_map(lambda x: x[index], dict(pool))


def pools_loss(sd, params, pools, rng, batch_size: int):
  """Diffusion loss of `params` (unet + text_encoder) on `batch_size` draws from each pool."""
  draw_rng, latent_rng, noise_rng = jax.random.split(rng, 3)
  batches = [draw(pool, key, batch_size)
             for pool, key in zip(pools, jax.random.split(draw_rng, len(pools)))]
  batch = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *batches)
  latents = diffusion.sample_latents(latent_rng, batch["mean"], batch["std"])
  return diffusion.text_conditioned_loss(sd, params, batch["input_ids"], latents, noise_rng,
                                         batch["weight"], batch.get("pixel_weights"))


def loss_fn(sd, train, frozen, aux, pools, rng, batch_size: int):
  """Diffusion loss of the merged model on `batch_size` draws from each pool."""
  return pools_loss(sd, lidb.merge(frozen, train, aux), pools, rng, batch_size)


def make_train_step(sd, optimizer: optax.GradientTransformation, batch_size: int):
  """jit(step)(train, opt_state, frozen, aux, pools, rng) -> (train, opt_state, loss).

  `pools` is a tuple of `make_pool` dicts (instance, and optionally prior images).
  """
  def step(train, opt_state, frozen, aux, pools, rng):
    loss, grads = jax.value_and_grad(
        lambda t: loss_fn(sd, t, frozen, aux, pools, rng, batch_size))(train)
    updates, opt_state = optimizer.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def make_generate(sd, num_steps: int):
  """jit(fn)(frozen, train, aux, cond_ids, uncond_ids, rng, guidance[, noise]) -> images
  [B, H, W, 3]. With `train=None` and `aux=None` the base model samples (a separate
  compilation); `noise`: the starting noise (`diffusion.generate`), else drawn from rng.
  """
  def generate(frozen, train, aux, cond_ids, uncond_ids, rng, guidance_scale, noise=None):
    params = frozen if train is None else lidb.merge(frozen, train, aux)
    return diffusion.generate(sd, params, cond_ids, uncond_ids, rng, guidance_scale,
                              num_steps, noise)

  return jax.jit(generate)


def make_generate_per_identity(sd, num_steps: int):
  """jit(fn)(frozen, train, aux, cond_ids, uncond_ids, rng, guidance) -> images [G * n, ...].

  `train` holds G identities' LiDB weights (leaves [G, ...]); `cond_ids` [G * n, L] are G
  consecutive groups of n prompts, group g sampled with identity g. One batch for all
  identities, through the low-rank side path (no merged copy per identity); `aux` is
  shared by all.
  """
  generate = _generate_per_identity_lora(sd, num_steps)

  def from_lidb(frozen, train, aux, cond_ids, uncond_ids, rng, guidance_scale):
    factors = jax.vmap(lidb.factors, in_axes=(0, None))(train, aux)        # leaves [G, ...]
    return generate(frozen, factors, cond_ids, uncond_ids, rng, guidance_scale)

  return jax.jit(from_lidb)


def make_generate_per_identity_lora(sd, num_steps: int):
  """jit(fn)(frozen, lora, cond_ids, uncond_ids, rng, guidance[, noise]) -> images
  [G * n, ...]: `make_generate_per_identity` for G identities' LoRAs (`lora` leaves
  [G, in, r] and [G, r, out], any rank); `noise` as in `make_generate`."""
  return jax.jit(_generate_per_identity_lora(sd, num_steps))


def _generate_per_identity_lora(sd, num_steps: int):
  from hdb_jax import preopt  # preopt's side path; preopt does not import this module

  def generate(frozen, factors, cond_ids, uncond_ids, rng, guidance_scale, noise=None):
    # diffusion.generate runs the models on [uncond rows; cond rows]: 2G groups.
    both = jax.tree_util.tree_map(lambda f: jnp.concatenate([f, f]), factors)
    with preopt.low_rank_side_path(both):
      return diffusion.generate(sd, frozen, cond_ids, uncond_ids, rng, guidance_scale,
                                num_steps, noise)

  return generate
