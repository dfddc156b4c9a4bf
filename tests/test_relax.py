"""Rank relaxation (hdb_jax/relax.py): exact re-parameterization, trainable extra
components, truncation, vmap/jit, and a relaxed LoRA summed exactly with another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import lora as lora_lib
from hdb_jax import relax

SHAPES = [(8, 6, 1), (6, 8, 2), (16, 16, 3), (5, 40, 1), (40, 5, 2), (3, 4, 3), (2, 5, 3)]


def _factors(rng, in_dim, out_dim, r):
  return (rng.normal(size=(in_dim, r)).astype(np.float32),
          rng.normal(size=(r, out_dim)).astype(np.float32))


@pytest.mark.parametrize("in_dim,out_dim,r", SHAPES)
@pytest.mark.parametrize("extra", [0, 1, 4, 50])
def test_relaxed_factors_reproduce_the_residual(in_dim, out_dim, r, extra):
  """rank >= rank(dW): down' @ up' == dW, from factors and from the dense residual; the
  new down' has unit columns (every extra component can learn)."""
  rng = np.random.default_rng(in_dim * 100 + out_dim + extra)
  down, up = _factors(rng, in_dim, out_dim, r)
  residual = down @ up
  rank = r + extra
  for relaxed in (relax.relax((down, up), rank), relax.relax(residual, rank)):
    new_down, new_up = relaxed
    assert new_down.shape == (in_dim, rank) and new_up.shape == (rank, out_dim)
    np.testing.assert_allclose(new_down @ new_up, residual, atol=2e-5 * np.abs(
        residual).max())
    np.testing.assert_allclose(np.linalg.norm(new_down, axis=0), 1.0, atol=1e-5)


def test_orthonormal_directions_when_there_is_room():
  rng = np.random.default_rng(0)
  down, up = _factors(rng, 32, 24, 1)
  new_down, _ = relax.relax((down, up), 4)
  np.testing.assert_allclose(new_down.T @ new_down, np.eye(4), atol=1e-5)


def test_zero_and_rank_deficient_residuals():
  rng = np.random.default_rng(1)
  zero_down, zero_up = relax.relax(np.zeros((10, 7), np.float32), 4)
  assert float(jnp.abs(zero_down @ zero_up).max()) == 0.0
  np.testing.assert_allclose(np.linalg.norm(zero_down, axis=0), 1.0, atol=1e-5)
  # rank 2 residual given as rank-3 factors (one column repeated): still exact at rank 2
  down, up = _factors(rng, 12, 9, 2)
  down3 = np.concatenate([down, down[:, :1]], axis=1)
  up3 = np.concatenate([up, np.zeros((1, 9), np.float32)], axis=0)
  new_down, new_up = relax.relax((down3, up3), 2)
  np.testing.assert_allclose(new_down @ new_up, down @ up, atol=1e-4)


def test_truncation_is_the_best_low_rank_approximation():
  rng = np.random.default_rng(2)
  residual = rng.normal(size=(9, 7)).astype(np.float32)
  down, up = relax.relax(residual, 2)
  u, s, vt = np.linalg.svd(residual)
  np.testing.assert_allclose(down @ up, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


def test_extra_components_get_gradients():
  """The pitfall: if both factors of a component were zero, it would never move."""
  rng = np.random.default_rng(3)
  down, up = _factors(rng, 16, 12, 1)
  new_down, new_up = relax.relax((down, up), 4)
  x = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  target = jnp.asarray(rng.normal(size=(32, 12)).astype(np.float32))
  grads = jax.grad(lambda f: jnp.mean((x @ f[0] @ f[1] - target) ** 2))((new_down, new_up))
  grad_rows = np.linalg.norm(np.asarray(grads[1]), axis=1)
  assert (grad_rows[1:] > 1e-4).all(), grad_rows


def test_jit_and_vmap_over_layers_of_equal_shape():
  rng = np.random.default_rng(4)
  downs = rng.normal(size=(5, 8, 1)).astype(np.float32)
  ups = rng.normal(size=(5, 1, 6)).astype(np.float32)
  new_down, new_up = jax.jit(jax.vmap(lambda d, u: relax.relax((d, u), 3)))(downs, ups)
  assert new_down.shape == (5, 8, 3) and new_up.shape == (5, 3, 6)
  np.testing.assert_allclose(np.einsum("lir,lro->lio", new_down, new_up),
                             np.einsum("lir,lro->lio", downs, ups), atol=1e-5)
  with pytest.raises(ValueError, match="rank"):
    relax.relax(downs[0], 0)


def test_relax_lora_then_concat_with_another():
  rng = np.random.default_rng(5)
  lora = {"unet": {"a/to_q": dict(zip(("down", "up"), _factors(rng, 8, 8, 1))),
                   "a/to_k": dict(zip(("down", "up"), _factors(rng, 8, 4, 1)))}}
  relaxed = relax.relax_lora(lora, 4)
  other = {"unet": {layer: dict(zip(("down", "up"), _factors(
      rng, f["down"].shape[0], f["up"].shape[1], 2))) for layer, f in lora["unet"].items()}}
  merged = lora_lib.concat([relaxed, other])
  for layer, f in lora["unet"].items():
    assert relaxed["unet"][layer]["down"].shape[1] == 4
    np.testing.assert_allclose(relaxed["unet"][layer]["down"] @ relaxed["unet"][layer]["up"],
                               f["down"] @ f["up"], atol=1e-5)
    o = other["unet"][layer]
    assert merged["unet"][layer]["down"].shape[1] == 6
    np.testing.assert_allclose(merged["unet"][layer]["down"] @ merged["unet"][layer]["up"],
                               f["down"] @ f["up"] + o["down"] @ o["up"], atol=1e-4)
