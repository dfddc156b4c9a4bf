"""Pre-optimization's loss on the tiny model: the grouped side path equals each identity's
merged model, and rematerialization changes what the backward pass keeps, not what it
computes. Apart from tests/test_preopt.py (whole runs) so that the two files compile on
both test workers at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import lidb, preopt


def test_side_path_equals_merge(tiny_model, tiny_lidb):
  """The grouped side path on a block of 2 identities computes exactly each identity's
  loss with its merged model (same draws, a prompt per image, face-masked weights), and
  the residual changes the loss."""
  sd, params = tiny_model
  spec, aux = tiny_lidb
  keys = jax.random.split(jax.random.key(1), 2)
  train = jax.vmap(lambda k: jax.tree_util.tree_map(  # U_train != 0: real residuals
      lambda x: x + 0.3 * jax.random.normal(k, x.shape), lidb.init(spec, k)))(keys)
  rng = np.random.default_rng(0)
  prompts = [["a sks face", "a sketch of a sks face"], ["a sks face on a blue background",
                                                        "a sks face"]]
  pool = {"mean": rng.normal(size=(2, 2, 4, 8, 8)).astype(np.float32),
          "std": np.full((2, 2, 4, 8, 8), 0.1, np.float32),
          "input_ids": np.stack([sd.tokenize(p) for p in prompts]),
          "pixel_weights": preopt.face_pixel_weights(
              rng.integers(0, 256, (2, 2, 32, 32), dtype=np.uint8), 8, 0.2)}
  rngs = jax.random.split(jax.random.key(3), 2)

  @jax.jit
  def losses(train, params, aux, pool, rngs):
    merged = [preopt.identity_loss(sd, "merge", jax.tree_util.tree_map(lambda x: x[i], train),
                                   params, aux, {k: v[i] for k, v in pool.items()},
                                   rngs[i], 2) for i in range(2)]
    base = preopt.identity_loss(sd, "side", lidb.init(spec, keys[0]), params, aux,
                                {k: v[0] for k, v in pool.items()}, rngs[0], 2)
    unweighted = preopt.block_losses(
        sd, train, params, aux, {k: v for k, v in pool.items() if k != "pixel_weights"},
        rngs, 2)
    return preopt.block_losses(sd, train, params, aux, pool, rngs, 2), \
        jnp.stack(merged), base, unweighted
  side, merged, base, unweighted = losses(train, params, aux, pool, rngs)
  np.testing.assert_allclose(side, merged, rtol=1e-5)
  assert abs(float(side[0]) - float(base)) > 1e-3  # the residual changed the loss
  assert np.all(np.abs(np.asarray(side) - np.asarray(unweighted)) > 1e-4)  # weights count


@pytest.mark.slow  # ~36 s: the loss compiled twice; per-block remat is checked (slow) too
def test_rematerialized_loss_has_the_same_values_and_gradients(tiny_model, tiny_lidb):
  """remat="dots" (the accelerator configs' memory option) changes what the backward pass
  keeps, not what it computes; an unknown policy is refused by name."""
  sd, params = tiny_model
  spec, aux = tiny_lidb
  keys = jax.random.split(jax.random.key(1), 2)
  train = jax.vmap(lambda k: jax.tree_util.tree_map(
      lambda x: x + 0.3 * jax.random.normal(k, x.shape), lidb.init(spec, k)))(keys)
  rng = np.random.default_rng(0)
  pool = {"mean": rng.normal(size=(2, 2, 4, 8, 8)).astype(np.float32),
          "std": np.full((2, 2, 4, 8, 8), 0.1, np.float32),
          "input_ids": np.broadcast_to(sd.tokenize(["a sks face"])[None], (2, 2, sd.max_length))}
  rngs = jax.random.split(jax.random.key(3), 2)

  def grads(remat):
    return jax.jit(jax.value_and_grad(lambda t: preopt.block_losses(
        sd, t, params, aux, pool, rngs, 2, remat).sum()))(train)
  (plain, plain_grads), (dots, dots_grads) = grads("none"), grads("dots")
  np.testing.assert_allclose(dots, plain, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         dots_grads, plain_grads)
  with pytest.raises(ValueError, match="remat must be one of"):
    grads("everything")
