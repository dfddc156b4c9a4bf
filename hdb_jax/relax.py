"""Rank relaxation: a predicted low-rank residual as a LoRA of higher rank, ready to train.

HyperDreamBooth's fast finetuning starts from the hypernetwork's rank-1 LiDB residual and
trains a LoRA of rank r' > 1 (docs/method.md). `relax` rewrites a residual dW [in, out]
(or its factors down [in, r] @ up [r, out]) exactly as down' [in, r'] @ up' [r', out]:

    dW = B diag(s) V^T  (an SVD; B completed to an orthonormal basis of R^in)
    down' = B[:, :r']       every column unit norm: the directions
    up'   = diag(s) V^T     the singular values; zero rows beyond rank(dW)

The pitfall it avoids: a component whose two factors are both zero gets no gradient, ever
(d/d down_j = g up_j^T and d/d up_j = down_j^T x^T g). Here the extra components have
up'_j = 0 but a unit down'_j, so they start at zero and still learn. When r' exceeds `in`
the basis is reused cyclically (no more than `in` orthonormal columns exist).

Everything is pure jax.numpy: jittable, and vmappable over layers of equal shape. The
exact sum of two LoRAs (factors stacked on the rank axis) is `lora.concat`.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp


def _relax_from_basis(basis, singular_rows, rank: int):
  """basis [in, in] orthonormal, singular_rows [m, out] (s_j v_j^T) -> (down, up)."""
  in_dim = basis.shape[0]
  columns = jnp.arange(rank) % in_dim
  down = basis[:, columns]                                             # [in, rank]
  m = singular_rows.shape[0]
  if rank >= m:
    up = jnp.concatenate([singular_rows, jnp.zeros((rank - m, singular_rows.shape[1]),
                                                   singular_rows.dtype)])
  else:  # truncation: the best rank-`rank` approximation (Eckart-Young)
    up = singular_rows[:rank]
  return down, up                                                      # up [rank, out]


def relax_residual(residual, rank: int):
  """dW [in, out] -> (down [in, rank], up [rank, out]) with down @ up == dW when
  rank >= rank(dW), else its best rank-`rank` approximation."""
  left, singular, right_t = jnp.linalg.svd(residual, full_matrices=True)
  m = singular.shape[0]                                                # min(in, out)
  return _relax_from_basis(left, singular[:, None] * right_t[:m], rank)


def relax_factors(down, up, rank: int):
  """Factors down [in, r] @ up [r, out] -> (down' [in, rank], up' [rank, out]), exact
  when rank >= rank(down @ up). Never forms an SVD of the dense [in, out] residual: a
  complete QR of down [in, r] and an SVD of the small core [r, out]."""
  r = down.shape[1]
  if r > down.shape[0]:  # more factor columns than inputs: the dense route is as cheap
    return relax_residual(down @ up, rank)
  q, triangular = jnp.linalg.qr(down, mode="complete")                # q [in, in]
  core = triangular[:r] @ up                                           # [r, out]
  core_left, singular, core_right_t = jnp.linalg.svd(core, full_matrices=True)
  m = singular.shape[0]                                                # min(r, out)
  basis = jnp.concatenate([q[:, :r] @ core_left, q[:, r:]], axis=1)   # [in, in]
  return _relax_from_basis(basis, singular[:, None] * core_right_t[:m], rank)


def relax(factors_or_residual, rank: int):
  """(down, up) or dW -> (down' [in, rank], up' [rank, out]); see the module docstring."""
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  if isinstance(factors_or_residual, (tuple, list)):
    down, up = factors_or_residual
    return relax_factors(down, up, rank)
  return relax_residual(factors_or_residual, rank)


def relax_lora(lora: Mapping, rank: int) -> dict:
  """A LoRA pytree {component: {layer: {"down", "up"}}} -> the same layers at `rank`."""
  out = {}
  for component, layers in lora.items():
    out[component] = {}
    for layer, f in layers.items():
      down, up = relax_factors(jnp.asarray(f["down"]), jnp.asarray(f["up"]), rank)
      out[component][layer] = {"down": down, "up": up}
  return out

