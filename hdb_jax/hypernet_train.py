"""Training the hypernetwork: augmentation, the loss, and one jitted, sharded optax step.

Loss per example (HyperDreamBooth):

    alpha * diffusion loss of the base with the example's predicted LiDB weights applied
  + beta  * ||theta_hat - theta||^2 to its pre-optimized weights

The predicted residuals go through the low-rank side path (`preopt.low_rank_side_path`):
the model runs once on the batch, row i with example i's factors, and no per-example
merged weights exist. The batch axis is sharded over the mesh axis "data"; the frozen base
is replicated, or its large kernels split along an "fsdp" axis (`frozen_shardings`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdb_jax import diffusion, hypernet, lidb, preopt


def augment(rng, images, hflip: bool, jitter: float):
  """(encoder input, diffusion target, flipped [B] bool) from images [B, H, W, 3] in [-1, 1].

  A random horizontal flip (both outputs: identity does not change with it) and, for the
  encoder input only, brightness and contrast jitter of relative size `jitter`: colours
  are part of an identity, so the diffusion target keeps the true ones.
  """
  flip_rng, bright_rng, contrast_rng = jax.random.split(rng, 3)
  batch = images.shape[0]
  flipped = jax.random.bernoulli(flip_rng, 0.5, (batch,)) & hflip
  images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1], images)
  target = images
  if jitter:
    brightness = jax.random.uniform(bright_rng, (batch, 1, 1, 1), minval=-jitter, maxval=jitter)
    contrast = 1.0 + jax.random.uniform(contrast_rng, (batch, 1, 1, 1), minval=-jitter,
                                        maxval=jitter)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    images = jnp.clip((images - mean) * contrast + mean + brightness, -1.0, 1.0)
  return images, target, flipped


def weight_loss_fn(kind: str):
  """Weight-space loss per example [B]: "params" compares the train values (the paper's
  ||theta_hat - theta||^2); "residual" compares the residuals D_train @ U_train [a, b]
  per layer, which equals ||dW_hat - dW||_F^2 (the aux matrices are orthonormal) and
  ignores how a rank-1 residual is split into its two factors."""
  if kind == "params":
    return hypernet.weight_loss
  if kind == "residual":
    def residual_loss(predicted, target):
      core = lambda t: jax.tree_util.tree_map(
          lambda w: w["D_train"] @ w["U_train"], t,
          is_leaf=lambda x: isinstance(x, dict) and "D_train" in x)
      return hypernet.weight_loss(core(predicted), core(target))
    return residual_loss
  raise ValueError(f"weight loss must be 'params' or 'residual', got {kind!r}")


def loss_fn(net, sd, params, frozen, aux, batch, rng, *, iterations: int, alpha: float,
            beta: float, weight_loss: str = "params", hflip: bool = True,
            jitter: float = 0.0, face_background_weight: float | None = None,
            remat: str = "none", frozen_encoder: bool = False):
  """Mean loss over the batch and its parts.

  batch: {"images" [B, H, W, 3] in [-1, 1], "input_ids" [B, L] (the prompt "a [V]
  face"), "target": the pre-optimized train pytree [B, ...], optionally "face_masks"
  uint8 [B, H, W]}. params: the hypernetwork's; with learned aux matrices under
  `hypernet.AUX_KEY` those replace `aux` (and are trained: the diffusion loss reaches them).
  frozen_encoder: the image encoder is not trained (`encoder_lr_scale` 0): no gradient is
  taken through it, so its activations are not kept for a backward pass (at SD1.5 scale a
  CLIP ViT-L/14 over 8 photos per device; docs/benchmarks.md "Simulated").
  """
  params, learned_aux = hypernet.split_aux(params, net.layout)
  if frozen_encoder:
    params = dict(params, encoder=jax.lax.stop_gradient(params["encoder"]))
  if learned_aux is not None:
    aux = learned_aux
  aug_rng, latent_rng, noise_rng = jax.random.split(rng, 3)
  encoder_input, images, flipped = augment(aug_rng, batch["images"], hflip, jitter)
  predicted = net.apply({"params": params}, encoder_input, iterations=iterations)
  metrics = {}
  total = 0.0
  if alpha:
    mean, std = sd.encode_images(frozen["vae"], images)                  # [B, C, h, w]
    latents = diffusion.sample_latents(latent_rng, mean, std)
    noise, timesteps = diffusion.noise_and_timesteps(sd, noise_rng, latents)
    examples = {"latents": latents, "noise": noise, "timesteps": timesteps,
                "input_ids": batch["input_ids"]}
    if face_background_weight is not None:
      masks = jnp.where(flipped[:, None, None], batch["face_masks"][:, :, ::-1],
                        batch["face_masks"])
      examples["pixel_weights"] = preopt.face_pixel_weights(masks, latents.shape[-1],
                                                            face_background_weight)
    factors = jax.vmap(lidb.factors, in_axes=(0, None))(predicted, aux)
    with preopt.low_rank_side_path(factors):
      diffusion_loss = preopt.examples_loss(sd, frozen, examples, remat).mean()
    metrics["diffusion_loss"] = diffusion_loss
    total = total + alpha * diffusion_loss
  if beta:
    weight = weight_loss_fn(weight_loss)(predicted, batch["target"]).mean()
    metrics["weight_loss"] = weight
    total = total + beta * weight
  metrics["loss"] = total
  return total, metrics


def optimizer(cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, gradient clipping; `cfg.encoder_lr_scale`
  scales the image encoder's updates (0: frozen encoder, e.g. a pretrained CLIP tower)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup, cfg.steps // 2), cfg.steps,
      end_value=cfg.learning_rate * cfg.get("final_lr_fraction", 0.1))
  adamw = optax.chain(optax.clip_by_global_norm(cfg.clip),
                      optax.adamw(schedule, weight_decay=cfg.weight_decay))
  scale = cfg.get("encoder_lr_scale", 1.0)
  if scale == 1.0:
    return adamw
  encoder = optax.set_to_zero() if scale == 0.0 else optax.chain(adamw, optax.scale(scale))
  label = lambda params: {k: "encoder" if k == "encoder" else "rest" for k in params}
  return optax.multi_transform({"encoder": encoder, "rest": adamw}, label)


def learning_rate(cfg, step):
  """The schedule's value at `step` (for logging)."""
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup, cfg.steps // 2), cfg.steps,
      end_value=cfg.learning_rate * cfg.get("final_lr_fraction", 0.1))(step)


def frozen_shardings(frozen, mesh: Mesh, fsdp_min_size: int = 2**18):
  """Shardings of the frozen base: replicated, or, when the mesh has an "fsdp" axis of
  size > 1, every array of >= `fsdp_min_size` values split along its largest dimension
  divisible by that size (jit gathers it where used)."""
  replicated = NamedSharding(mesh, P())
  size = mesh.shape.get("fsdp", 1)

  def choose(x):
    if size == 1 or x.size < fsdp_min_size:
      return replicated
    dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % size == 0]
    if not dims:
      return replicated
    spec = [None] * x.ndim
    spec[dims[0]] = "fsdp"
    return NamedSharding(mesh, P(*spec))
  return jax.tree_util.tree_map(choose, frozen)


@dataclasses.dataclass(frozen=True)
class StepFns:
  """train(state, frozen, aux, batch, step) -> (state, metrics); state = {"params",
  "opt_state"}; batch leaves sharded over "data"; metrics replicated scalars."""
  train: callable
  batch_sharding: NamedSharding
  replicated: NamedSharding


def make_step(net, sd, tx: optax.GradientTransformation, mesh: Mesh, frozen_sharding,
              *, seed: int, loss_kwargs: Mapping) -> StepFns:
  """One jitted optax step over a global batch sharded along the mesh's "data" axis.

  Randomness: fold_in(key(seed), step), drawn for the global batch (JAX's partitionable
  threefry gives the same values for any sharding), so results do not depend on the
  device count.
  """
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def train_step(state, frozen, aux, batch, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(net, sd, p, frozen, aux, batch, rng, **loss_kwargs),
        has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return {"params": params, "opt_state": opt_state}, metrics

  train = jax.jit(train_step,
                  in_shardings=(replicated, frozen_sharding, replicated, batch_sharding,
                                replicated),
                  out_shardings=(replicated, replicated), donate_argnums=(0,))
  return StepFns(train=train, batch_sharding=batch_sharding, replicated=replicated)
