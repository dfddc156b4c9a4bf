"""The Stable Diffusion 1.x / 2.x UNet (diffusers' UNet2DConditionModel) in flax.linen.

    UNet2DConditionModel(UNetConfig.from_dict(config_json), dtype)
        .apply({"params": p}, sample [B, C, h, w], timesteps [B] or (), context [B, L, D])
        -> [B, C_out, h, w]

NCHW in and out, as diffusers' Flax class took it; NHWC inside. Parameter names are
those of diffusers' FlaxUNet2DConditionModel (`down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q`, `mid_block/resnets_1`, `up_blocks_1/upsamplers_0/conv`,
...). Numbers are those of diffusers' PyTorch UNet: the exact GELU in the feed-forward,
GroupNorm eps 1e-6 in the spatial transformers and `norm_eps` elsewhere.

Supported: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn (or none),
UpBlock2D / CrossAttnUpBlock2D; heads per block or one count; SD2's linear projections;
`upcast_attention` (attention in float32). Everything else that SD1.x/2.x do not use
(class or addition embeddings, dual or cross-only attention, ...) raises on reading.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.nn import blocks

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# config.json keys of features we do not implement: the values we accept.
_FIXED = {
    "num_attention_heads": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,),
    "addition_embed_type": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,), "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "center_input_sample": (False,),
    "act_fn": ("silu", "swish"), "downsample_padding": (1,), "mid_block_scale_factor": (1.0,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The keys of a diffusers UNet2DConditionModel config.json that define this model.

  `attention_head_dim` is, as diffusers reads it, the number of heads (one, or one per
  down block); each head has channels / heads dimensions. `dropout` is kept for the
  config file but never applied.
  """
  sample_size: int = 32
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  attention_head_dim: int | tuple[int, ...] = 8
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  only_cross_attention: bool | tuple[bool, ...] = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0

  def __post_init__(self):
    blocks_n = len(self.block_out_channels)
    def fail(key, why):
      raise ValueError(f"UNetConfig: {key}={getattr(self, key)!r} is not supported ({why})")
    for key in ("sample_size", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
      if not isinstance(getattr(self, key), int):
        fail(key, "an int")
    for key, kinds in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
      types = getattr(self, key)
      if len(types) != blocks_n or any(kind not in kinds for kind in types):
        fail(key, f"one of {kinds} per block_out_channels entry")
    if self.mid_block_type not in MID_BLOCKS:
      fail("mid_block_type", f"one of {MID_BLOCKS}")
    if any(self._per_block(self.only_cross_attention)):
      fail("only_cross_attention", "False only")
    for key in ("attention_head_dim", "transformer_layers_per_block"):
      values = self._per_block(getattr(self, key))
      if len(values) != blocks_n or not all(isinstance(v, int) and v > 0 for v in values):
        fail(key, "a positive int, or one per block")
    for channels, heads in zip(self.block_out_channels, self.num_heads):
      if channels % heads:
        fail("attention_head_dim", f"{channels} channels do not split into {heads} heads")
    if self.block_out_channels[0] % 2:
      fail("block_out_channels", "the first must be even (the timestep embedding)")

  def _per_block(self, value) -> tuple:
    """One value per block: a tuple as it is, a single value repeated."""
    if isinstance(value, (tuple, list)):
      return tuple(value)
    return (value,) * len(self.block_out_channels)

  @property
  def num_heads(self) -> tuple[int, ...]:
    """Attention heads of each down block (the up blocks in reverse order)."""
    return self._per_block(self.attention_head_dim)

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return self._per_block(self.transformer_layers_per_block)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
    """From a diffusers UNet2DConditionModel (or FlaxUNet2DConditionModel) config.json;
    other keys ignored, unsupported values raise ValueError naming the key."""
    return blocks.read_config(cls, config, _FIXED)

  def to_dict(self) -> dict:
    """A config.json that PyTorch diffusers' UNet2DConditionModel reads."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0",
            "act_fn": "silu", **out}


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """Sinusoidal embedding [N, dim] float32 of timesteps [N], as diffusers':
  frequencies exp(-ln(10000) i / (dim / 2 - freq_shift)), i < dim / 2; [sin, cos]
  or, flipped, [cos, sin]."""
  half = dim // 2
  exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [N, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def _transformer(block, heads: int, depth: int, name: str):
  """A spatial transformer of `block` (a module with config, dtype, attention, remat)."""
  config = block.config
  transformer = blocks.rematerialized(blocks.Transformer2DModel, block.remat)
  return transformer(heads, depth, config.norm_num_groups, 1e-6, config.use_linear_projection,
                     config.upcast_attention, block.dtype, block.attention, name=name)


def _resnet(block, channels: int, name: str):
  config = block.config
  resnet = blocks.rematerialized(blocks.ResnetBlock2D, block.remat)
  return resnet(channels, config.norm_num_groups, config.norm_eps, block.dtype, name=name)


class DownBlock(nn.Module):
  """`layers_per_block` ResNet blocks (each followed by a spatial transformer when `heads`), then
  a stride-2 downsampler unless last. Returns the output and every skip [B, H, W, C]."""
  config: UNetConfig
  channels: int
  heads: int | None  # None: DownBlock2D
  depth: int
  last: bool
  dtype: Any = jnp.float32
  attention: str = "xla"  # hdb_jax/nn/attention.py IMPLEMENTATIONS
  remat: str = "none"     # hdb_jax/nn/blocks.py REMAT

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.config.layers_per_block):
      x = _resnet(self, self.channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = _transformer(self, self.heads, self.depth, f"attentions_{i}")(x, context)
      skips.append(x)
    if not self.last:
      x = blocks.Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """A ResNet block per skip (layers + 1), each on the input concatenated with the last skip
  (and followed by a spatial transformer when `heads`), then 2x upsampling unless last."""
  config: UNetConfig
  channels: int
  heads: int | None  # None: UpBlock2D
  depth: int
  last: bool
  dtype: Any = jnp.float32
  attention: str = "xla"  # hdb_jax/nn/attention.py IMPLEMENTATIONS
  remat: str = "none"     # hdb_jax/nn/blocks.py REMAT

  @nn.compact
  def __call__(self, x, skips, temb, context):
    # skips: the last layers + 1 outputs of the down path, oldest first
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip], axis=-1)
      x = _resnet(self, self.channels, f"resnets_{i}")(x, temb)
      if self.heads:
        x = _transformer(self, self.heads, self.depth, f"attentions_{i}")(x, context)
    if not self.last:
      x = blocks.Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class MidBlock(nn.Module):
  """ResNet, spatial transformer, ResNet."""
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, temb, context):
    channels = x.shape[-1]
    x = _resnet(self, channels, "resnets_0")(x, temb)
    x = _transformer(self, self.config.num_heads[-1], self.config.transformer_layers[-1],
                     "attentions_0")(x, context)
    return _resnet(self, channels, "resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
  """Noise (or v) prediction: sample [B, C, h, w], timesteps [B] or scalar, context
  [B, L, cross_attention_dim] -> [B, out_channels, h, w] in `dtype`.
  `attention`: the attention kernel (hdb_jax/nn/attention.py IMPLEMENTATIONS); `remat`:
  each ResNet block and spatial transformer rematerialized (hdb_jax/nn/blocks.py REMAT).
  Neither changes the parameters or the values."""
  config: UNetConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states):
    config, dtype = self.config, self.dtype
    channels = config.block_out_channels
    timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), sample.shape[:1])
    temb = timestep_embedding(timesteps, channels[0], config.flip_sin_to_cos, config.freq_shift)
    temb = _TimeEmbedding(4 * channels[0], dtype, name="time_embedding")(temb)  # [B, 4 C0]

    x = jnp.transpose(sample, (0, 2, 3, 1))  # [B, h, w, C]
    x = blocks.conv(channels[0], 3, dtype, "conv_in")(x)
    skips = [x]
    last = len(channels) - 1
    for i, kind in enumerate(config.down_block_types):
      heads = config.num_heads[i] if kind == "CrossAttnDownBlock2D" else None
      x, block_skips = DownBlock(config, channels[i], heads, config.transformer_layers[i],
                                 i == last, dtype, self.attention, self.remat,
                                 name=f"down_blocks_{i}")(
                                     x, temb, encoder_hidden_states)
      skips += list(block_skips)
    if config.mid_block_type is not None:
      x = MidBlock(config, dtype, self.attention, self.remat, name="mid_block")(
          x, temb, encoder_hidden_states)
    per_up_block = config.layers_per_block + 1
    for i, kind in enumerate(config.up_block_types):
      block = last - i  # the down block this up block mirrors
      heads = config.num_heads[block] if kind == "CrossAttnUpBlock2D" else None
      block_skips, skips = tuple(skips[-per_up_block:]), skips[:-per_up_block]
      x = UpBlock(config, channels[block], heads, config.transformer_layers[block], i == last,
                  dtype, self.attention, self.remat, name=f"up_blocks_{i}")(
                      x, block_skips, temb, encoder_hidden_states)

    x = nn.GroupNorm(config.norm_num_groups, epsilon=config.norm_eps, name="conv_norm_out")(x)
    x = blocks.conv(config.out_channels, 3, dtype, "conv_out")(nn.silu(x))
    return jnp.transpose(x, (0, 3, 1, 2))  # [B, C_out, h, w]


class _TimeEmbedding(nn.Module):
  """linear_1, SiLU, linear_2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


def param_shapes(module: UNet2DConditionModel) -> dict:
  """Abstract params (ShapeDtypeStructs) of `module`, nothing allocated."""
  config = module.config
  size = 2 ** (len(config.block_out_channels) - 1)
  sample = jax.ShapeDtypeStruct((1, config.in_channels, size, size), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  timesteps = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda s, t, c: module.init(jax.random.key(0), s, t, c),
                        sample, timesteps, context)["params"]
