"""Diffusion training loss and a classifier-free-guided DDIM sampler, as pure functions.

The noise schedule, prediction type (epsilon or v) and the DDIM update come from the
model's scheduler config (`sd.scheduler`, the arithmetic in hdb_jax/nn/ddim.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdb_jax.nn import ddim


def sample_latents(rng, mean, std):
  """A draw from the VAE's latent distribution: mean + std * N(0, 1), all [B, C, h, w]."""
  return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)


def noise_and_timesteps(sd, rng, latents):
  """Gaussian noise like `latents` [B, C, h, w] and uniform training timesteps [B]."""
  noise_rng, t_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
  num_train = sd.scheduler.num_train_timesteps
  timesteps = jax.random.randint(t_rng, (latents.shape[0],), 0, num_train)
  return noise, timesteps


def per_example_loss(sd, unet_params, context, latents, rng, pixel_weights=None):
  """Mean squared error of the UNet's prediction, per example [B], for noise and
  timesteps drawn from `rng` (`noise_and_timesteps`). See `loss_given_noise`."""
  noise, timesteps = noise_and_timesteps(sd, rng, latents)
  return loss_given_noise(sd, unet_params, context, latents, noise, timesteps, pixel_weights)


def loss_given_noise(sd, unet_params, context, latents, noise, timesteps,
                     pixel_weights=None):
  """Mean squared error of the UNet's prediction, per example [B].

  latents, noise [B, C, h, w]; timesteps [B]; context [B, L, D]. The target is the noise
  (epsilon) or the velocity (v-prediction), as the scheduler config says.
  `pixel_weights` [B, h, w] (e.g. a face mask on the latent grid): a weighted mean over
  the latent positions instead of the plain mean.
  """
  noisy = ddim.add_noise(sd.scheduler, latents, noise, timesteps)
  if sd.prediction_type == "epsilon":
    target = noise
  elif sd.prediction_type == "v_prediction":
    target = ddim.velocity(sd.scheduler, latents, noise, timesteps)
  else:
    raise ValueError(f"unsupported prediction_type {sd.prediction_type!r}")
  prediction = sd.predict(unet_params, noisy, timesteps, context)
  error = (prediction.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
  if pixel_weights is None:
    return error.reshape(error.shape[0], -1).mean(axis=1)
  weights = pixel_weights.astype(jnp.float32)[:, None]                # [B, 1, h, w]
  return (error * weights).sum(axis=(1, 2, 3)) / (
      weights.sum(axis=(1, 2, 3)) * error.shape[1] + 1e-8)


def text_conditioned_loss(sd, params, input_ids, latents, rng, weights=None,
                          pixel_weights=None):
  """Diffusion loss of `params` (unet + text_encoder) on latents [B, C, h, w] and
  prompts [B, L]; `weights` [B] (e.g. prior-preservation weight) default to 1;
  `pixel_weights` [B, h, w]: per-position weights (`loss_given_noise`)."""
  context = sd.encode_text(params["text_encoder"], input_ids)
  losses = per_example_loss(sd, params["unet"], context, latents, rng, pixel_weights)
  if weights is None:
    return losses.mean()
  return (losses * weights).sum() / weights.sum()


def generate(sd, params, cond_ids, uncond_ids, rng, guidance_scale, num_steps: int,
             noise=None):
  """Images [B, H, W, 3] in [-1, 1] for prompts `cond_ids` [B, L].

  DDIM (eta = 0) with classifier-free guidance against `uncond_ids` [B, L] (usually
  the empty prompt), as one `lax.scan`: jit it with `num_steps` static and it compiles
  once for any params, prompts, seed and guidance scale. The only randomness is the
  starting noise: drawn from `rng`, or given as `noise` [B, C, h, w] (standard normal),
  e.g. the same per sample whatever the batch it is sampled in (`noise_for`).
  """
  batch = cond_ids.shape[0]
  shape = (batch, sd.latent_channels, sd.latent_size, sd.latent_size)
  context = sd.encode_text(params["text_encoder"], jnp.concatenate([uncond_ids, cond_ids]))
  if noise is None:
    noise = jax.random.normal(rng, shape, jnp.float32)
  latents = noise  # DDIM starts from unit-variance noise

  def denoise(latents, t):
    both = jnp.concatenate([latents, latents])
    timesteps = jnp.broadcast_to(t, (2 * batch,))
    uncond, cond = jnp.split(sd.predict(params["unet"], both, timesteps, context), 2)
    guided = uncond + guidance_scale * (cond - uncond)
    return ddim.step(sd.scheduler, guided, t, latents, num_steps), None

  latents, _ = jax.lax.scan(denoise, latents, ddim.timesteps(sd.scheduler, num_steps))
  return sd.decode_latents(params["vae"], latents)


def noise_for(sd, keys) -> jax.Array:
  """Starting noise [N, C, h, w], row i drawn from keys[i] alone."""
  shape = (sd.latent_channels, sd.latent_size, sd.latent_size)
  return jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(keys)
