"""Pieces shared by the UNet and the VAE (flax.linen, NHWC): the ResNet block, down- and
upsampling, the spatial transformer with its attention and GEGLU feed-forward, and the
config reading both use.

Submodule names are those of diffusers' Flax classes (`resnets_0/conv1`, `attn1/to_q`,
`ff/net_0/proj`, ...), so parameter trees match theirs; every submodule is named
explicitly, so a module's path equals its parameter path (LiDB intercepts the attention
projections by path). Normalizations run in float32 (params and statistics) and the
convolutions and dense layers in `dtype`, as diffusers' Flax classes did.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.nn.attention import dot_product_attention, merge_heads, projections, split_heads


def read_config(cls, config: Mapping[str, Any], fixed: Mapping[str, tuple]):
  """A frozen dataclass `cls` from an upstream config.json dict: keys that are fields
  are read (JSON lists become tuples), keys in `fixed` must hold one of the listed
  values (else ValueError naming the key and value), other keys are ignored."""
  config = dict(config)
  for key, allowed in fixed.items():
    if key in config and not any(_same(config[key], value) for value in allowed):
      raise ValueError(f"{cls.__name__}: {key}={config[key]!r} is not supported "
                       f"(supported: {' or '.join(repr(v) for v in allowed)})")
  names = {field.name for field in dataclasses.fields(cls)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
  return cls(**values)


def _same(value, allowed) -> bool:
  if isinstance(allowed, bool) or allowed is None:
    return value is allowed
  return type(value) is not bool and value == allowed


# Per-block rematerialization (`model.remat`): the block's forward pass runs again inside
# the backward pass instead of keeping its activations. "blocks" keeps the outputs of
# matmuls against weights (jax.checkpoint_policies.dots_with_no_batch_dims_saveable: the
# Dense projections, cheap to keep) and recomputes norms, activations, convolutions and
# attention's [B, H, L, S] maps; "blocks_min" keeps only each block's inputs. The same
# values and gradients either way.
REMAT_POLICIES = {
    "none": None,
    "blocks": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "blocks_min": jax.checkpoint_policies.nothing_saveable,
}
REMAT = tuple(REMAT_POLICIES)


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={remat!r} is not supported (supported: {', '.join(REMAT)})")
  return remat


@functools.lru_cache(maxsize=None)
def rematerialized(module_class, remat: str):
  """`module_class`, or its `nn.remat` under the policy REMAT_POLICIES[remat]. Parameter
  paths are unchanged (the lifted module keeps the name it is given)."""
  if check_remat(remat) == "none":
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICIES[remat])


def conv(features: int, kernel: int, dtype, name: str, strides: int = 1,
         padding: Any = None) -> nn.Conv:
  """A square convolution; `padding` None: (kernel - 1) / 2 on every side, as PyTorch's
  padding=1 for 3x3 and 0 for 1x1."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm, SiLU, 3x3 conv, (+ time embedding), GroupNorm, SiLU, 3x3 conv, + input
  (through a 1x1 `conv_shortcut` when the channel count changes). Dropout: none."""
  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    # x [B, H, W, C_in], temb [B, T] or None (the VAE's blocks have no time embedding)
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return h + x  # [B, H, W, C_out]


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE encoder (`pad_end`) pads
  only the bottom and right edge by 1, as diffusers' AutoencoderKL does."""
  out_channels: int
  pad_end: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.pad_end:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    padding = "VALID" if self.pad_end else None
    return conv(self.out_channels, 3, self.dtype, "conv", strides=2, padding=padding)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return conv(self.out_channels, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
  """Multi-head attention of x over `context` (itself when None): to_q/to_k/to_v
  without bias, to_out_0 with. `upcast`: attention in float32 whatever `dtype`.
  `attention`: the kernel (hdb_jax/nn/attention.py IMPLEMENTATIONS)."""
  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context=None):
    # x [B, L, C], context [B, S, C_ctx]
    context = x if context is None else context
    projected = projections(self, {"to_q": x, "to_k": context, "to_v": context},
                            self.heads * self.head_dim, use_bias=False, dtype=self.dtype)
    q = split_heads(projected["to_q"], self.heads)  # [B, L, H, D]
    k = split_heads(projected["to_k"], self.heads)  # [B, S, H, D]
    v = split_heads(projected["to_v"], self.heads)
    if self.upcast:
      q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    out = dot_product_attention(q, k, v, implementation=self.attention)
    out = merge_heads(out).astype(self.dtype)  # [B, L, H * D]
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """proj to 2 x hidden, then (first half) * GELU(second half); the exact (erf) GELU."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * self.hidden, dtype=self.dtype, name="proj")(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU to 4 x width (`net_0`), then back (`net_2`)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = GEGLU(4 * width, self.dtype, name="net_0")(x)
    return nn.Dense(width, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention on the context, GEGLU feed-forward,
  each with a residual."""
  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    # x [B, L, C], context [B, S, C_ctx]
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attention = lambda name: Attention(self.heads, self.head_dim, self.upcast, self.dtype,
                                       self.attention, name=name)
    x = x + attention("attn1")(norm("norm1")(x))
    x = x + attention("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """The spatial transformer: GroupNorm, `proj_in` (1x1 conv, or dense with
  `linear_projection` as in SD2), `depth` transformer blocks over the H x W positions,
  `proj_out`, + input. Heads x head_dim must equal the channel count."""
  heads: int
  depth: int
  groups: int
  eps: float
  linear_projection: bool = False
  upcast: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, context):
    # x [B, H, W, C], context [B, S, C_ctx]
    batch, height, width, channels = x.shape
    project = ((lambda name: nn.Dense(channels, dtype=self.dtype, name=name))
               if self.linear_projection else (lambda name: conv(channels, 1, self.dtype, name)))
    h = nn.GroupNorm(self.groups, epsilon=self.eps, name="norm")(x)
    if self.linear_projection:
      h = project("proj_in")(h.reshape(batch, height * width, channels))  # [B, HW, C]
    else:
      h = project("proj_in")(h).reshape(batch, height * width, channels)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, channels // self.heads, self.upcast, self.dtype,
                                self.attention, name=f"transformer_blocks_{i}")(h, context)
    if self.linear_projection:
      h = project("proj_out")(h).reshape(batch, height, width, channels)
    else:
      h = project("proj_out")(h.reshape(batch, height, width, channels))
    return h + x
