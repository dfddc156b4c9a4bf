"""Pretraining a small SD-like base from scratch: VAE first, then UNet + text encoder.

Stage 1 trains the VAE (reconstruction + a small KL term). Stage 2 encodes the dataset
once and trains the UNet and the CLIP text encoder jointly with the diffusion loss on
those latents, with caption variants (`hdb_jax.mini.captions`), caption dropout (for
classifier-free guidance) and an EMA of the weights, which is what gets saved. All steps are jitted pure functions; data stays on
the device and batches are drawn inside the step from `fold_in(seed, step)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from hdb_jax import diffusion


def vae_loss(sd, vae_params, images, rng, kl_weight: float):
  """Reconstruction MSE + kl_weight * KL per latent value; images [B, H, W, 3] in [-1, 1]."""
  vae = sd.vae
  mean, std = vae.apply({"params": vae_params}, images, method=vae.encode)  # [B, h, w, C]
  latents = mean + std * jax.random.normal(rng, mean.shape)
  recon = vae.apply({"params": vae_params}, latents, method=vae.decode)     # [B, H, W, 3]
  mse = jnp.mean((recon - images) ** 2)
  # KL(N(mean, std^2) || N(0, 1)) summed over each latent, then per latent value
  kl_per_image = 0.5 * jnp.sum(mean ** 2 + std ** 2 - 1.0 - 2.0 * jnp.log(std), axis=(1, 2, 3))
  kl = jnp.mean(kl_per_image) / latents[0].size
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}


def make_vae_step(sd, optimizer, batch_size: int, kl_weight: float):
  """jit(step)(vae_params, opt_state, images [N, H, W, 3], rng) -> (params, opt_state, metrics)."""
  def step(vae_params, opt_state, images, rng):
    draw_rng, sample_rng = jax.random.split(rng)
    batch = images[jax.random.randint(draw_rng, (batch_size,), 0, images.shape[0])]
    (loss, metrics), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
        sd, vae_params, batch, sample_rng, kl_weight)
    updates, opt_state = optimizer.update(grads, opt_state, vae_params)
    return optax.apply_updates(vae_params, updates), opt_state, dict(metrics, loss=loss)

  return jax.jit(step, donate_argnums=(0, 1))


def encode_dataset(sd, vae_params, images, batch_size: int = 512):
  """Latent mean and std of every image: [N, C, h, w] each (unscaled by scaling_factor)."""
  encode = jax.jit(sd.encode_images)
  means, stds = [], []
  for start in range(0, images.shape[0], batch_size):
    mean, std = encode(vae_params, images[start:start + batch_size])
    means.append(mean)
    stds.append(std)
  scale = sd.vae.config.scaling_factor
  return jnp.concatenate(means) / scale, jnp.concatenate(stds) / scale


def with_vae_scaling(sd, scaling_factor: float):
  """The same components with the VAE's latent scaling factor replaced (SD's 0.18215 is
  1/std of its latents; a new VAE gets its own)."""
  vae_config = dataclasses.replace(sd.vae.config, scaling_factor=float(scaling_factor))
  return dataclasses.replace(sd, vae=sd.vae.clone(config=vae_config))


def diffusion_loss(sd, params, data, uncond_ids, rng, batch_size: int, caption_dropout: float):
  """Diffusion loss of params {"unet", "text_encoder"} on a batch drawn from `data`
  ({"mean", "std": [N, C, h, w] scaled latents, "input_ids": [N, V, L]: V caption
  variants per image, one drawn per example and step})."""
  draw_rng, variant_rng, drop_rng, latent_rng, noise_rng = jax.random.split(rng, 5)
  num_images, num_variants, _ = data["input_ids"].shape
  index = jax.random.randint(draw_rng, (batch_size,), 0, num_images)
  variant = jax.random.randint(variant_rng, (batch_size,), 0, num_variants)
  latents = diffusion.sample_latents(latent_rng, data["mean"][index], data["std"][index])
  drop = jax.random.uniform(drop_rng, (batch_size, 1)) < caption_dropout
  input_ids = jnp.where(drop, uncond_ids[None, :], data["input_ids"][index, variant])
  return diffusion.text_conditioned_loss(sd, params, input_ids, latents, noise_rng)


def make_diffusion_step(sd, optimizer, batch_size: int, caption_dropout: float,
                        ema_decay: float):
  """jit(step)(state, data, uncond_ids [L], rng) -> (state, loss).

  state = {"params", "ema", "opt_state"}; params/ema = {"unet", "text_encoder"}.
  """
  def step(state, data, uncond_ids, rng):
    loss, grads = jax.value_and_grad(diffusion_loss, argnums=1)(
        sd, state["params"], data, uncond_ids, rng, batch_size, caption_dropout)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optax.incremental_update(params, state["ema"], 1.0 - ema_decay)
    return {"params": params, "ema": ema, "opt_state": opt_state}, loss

  return jax.jit(step, donate_argnums=(0,))


def optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float = 0.0):
  """AdamW with linear warmup and cosine decay, gradient clipping at norm 1."""
  warmup = min(warmup, steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps,
                                                end_value=0.1 * learning_rate)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))
