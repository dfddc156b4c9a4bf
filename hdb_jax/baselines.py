"""The comparison table's baselines that change more than a low-rank residual.

DreamBooth proper (Ruiz et al., 2022): the whole UNet finetuned on the subject's photos
with a rare-token prompt ("a sks face"), plus the class-specific prior-preservation loss
on images the frozen base made of the class ("a face"), so that the class keeps looking
like the base's. Its "aggressive" variants (HyperDreamBooth's table) are the same with a
high learning rate and few steps.

Textual Inversion (Gal et al., 2022): only the identifier token's embedding row learns;
the text encoder and the UNet stay frozen.

Both return the changed components only ({"unet": ...} or {"text_encoder": ...}); merge
them over the frozen base to sample. Steps are one jitted optax update each, with the
frozen params as arguments (never closed over).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdb_jax import dreambooth

TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def make_finetune_step(sd, tx: optax.GradientTransformation, batch_size: int):
  """jit(step)(trained, opt_state, frozen, pools, rng) -> (trained, opt_state, loss):
  `trained` is a dict of whole components ({"unet": params}) replacing frozen's."""
  def step(trained, opt_state, frozen, pools, rng):
    loss, grads = jax.value_and_grad(
        lambda t: dreambooth.pools_loss(sd, {**frozen, **t}, pools, rng, batch_size))(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def class_pool(sd, frozen, generate_base, class_ids, count: int, rng, guidance_scale: float,
               weight: float) -> dict:
  """The prior-preservation pool: `count` images of the class prompt (ids [1, L]) made by
  the frozen base, VAE-encoded once, with loss weight `weight`."""
  cond = np.repeat(class_ids, count, 0)
  uncond = np.repeat(sd.tokenize([""]), count, 0)
  images = generate_base(frozen, None, None, cond, uncond, rng, guidance_scale)
  latents = dreambooth.encode_subject(sd, frozen["vae"], np.asarray(images), hflip=False)
  return dreambooth.make_pool(latents, class_ids, weight)


def dreambooth_finetune(step, tx, frozen, pools, *, steps: int, seed: int,
                        components=("unet",)) -> dict:
  """DreamBooth proper: `steps` updates of the whole `components` -> {component: params}.
  `step` is `make_finetune_step(sd, tx, batch)`; `pools` the instance pool and, for
  prior preservation, `class_pool`'s."""
  trained = {c: jax.tree_util.tree_map(jnp.array, frozen[c]) for c in components}  # copies
  opt_state = tx.init(trained)
  key = jax.random.key(seed)
  for k in range(steps):
    trained, opt_state, _ = step(trained, opt_state, frozen, tuple(pools),
                                 jax.random.fold_in(key, k))
  return trained


def with_token_row(text_params: Mapping, token_id: int, row) -> dict:
  """The text encoder's params with one row of the token table replaced by `row` [D]."""
  table = text_params
  for key in TOKEN_TABLE:
    table = table[key]
  new_table = table.at[token_id].set(row)

  def replace(tree, path):
    if not path:
      return new_table
    return {**tree, path[0]: replace(tree[path[0]], path[1:])}

  return replace(dict(text_params), TOKEN_TABLE)


def make_inversion_step(sd, tx: optax.GradientTransformation, batch_size: int, token_id: int):
  """jit(step)(row [D], opt_state, frozen, pools, rng) -> (row, opt_state, loss): Textual
  Inversion's update of the identifier token's embedding row."""
  def step(row, opt_state, frozen, pools, rng):
    def loss(row):
      params = {**frozen, "text_encoder": with_token_row(frozen["text_encoder"], token_id, row)}
      return dreambooth.pools_loss(sd, params, pools, rng, batch_size)
    value, grad = jax.value_and_grad(loss)(row)
    updates, opt_state = tx.update(grad, opt_state, row)
    return optax.apply_updates(row, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def textual_inversion(step, tx, frozen, pools, token_id: int, *, steps: int,
                      seed: int) -> dict:
  """Textual Inversion from the token's current embedding -> {"text_encoder": params}."""
  table = frozen["text_encoder"]
  for key in TOKEN_TABLE:
    table = table[key]
  row = jnp.array(table[token_id])
  opt_state = tx.init(row)
  key = jax.random.key(seed)
  for k in range(steps):
    row, opt_state, _ = step(row, opt_state, frozen, tuple(pools), jax.random.fold_in(key, k))
  return {"text_encoder": with_token_row(frozen["text_encoder"], token_id, row)}
