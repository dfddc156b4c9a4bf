"""Multi-head scaled dot-product attention, shared by the UNet, the VAE and CLIP.

Arrays are [B, L, H, D] (batch, positions, heads, head dim). The kernel is chosen in one
place, `dot_product_attention(..., implementation=)`: None lets JAX pick (the XLA
softmax(q k^T / sqrt(D)) v everywhere today); platform-specific ones go through here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, H * D] -> [B, L, H, D]."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, L, H, D] -> [B, L, H * D]."""
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head.

  query [B, L, H, D], key and value [B, S, H, D] -> [B, L, H, D] in query's dtype.
  `mask`: boolean, broadcastable to [B, H, L, S], True where a query may attend a key.
  Logits and softmax are float32 whatever the input dtype.
  """
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)
  return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                      implementation=implementation)
