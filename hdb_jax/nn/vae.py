"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in flax.linen, NHWC.

    vae = AutoencoderKL(VAEConfig.from_dict(config_json), dtype)
    mean, std = vae.apply({"params": p}, images, method=vae.encode)   # [B, H, W, 3] in [-1, 1]
    images = vae.apply({"params": p}, latents, method=vae.decode)     # -> [B, H, W, 3]

Latents are unscaled ([B, H / 2^(n-1), W / 2^(n-1), latent_channels]); `scaling_factor`
is the caller's. Parameter names are those of diffusers' FlaxAutoencoderKL
(`encoder/down_blocks_0/resnets_0/conv1`, `encoder/mid_block/attentions_0/query`,
`quant_conv`, `post_quant_conv`, `decoder/up_blocks_0/upsamplers_0/conv`, ...); numbers
are those of the PyTorch AutoencoderKL (GroupNorm eps 1e-6, one-head mid attention, the
encoder's downsampling padded on the bottom and right edge only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.nn import blocks
from hdb_jax.nn.attention import dot_product_attention

EPS = 1e-6

# config.json keys of features we do not implement: the values we accept.
_FIXED = {
    "act_fn": ("silu", "swish"), "shift_factor": (None,), "latents_mean": (None,),
    "latents_std": (None,), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The keys of a diffusers AutoencoderKL config.json that define this model."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215

  def __post_init__(self):
    blocks_n = len(self.block_out_channels)
    for key, name in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
      value = getattr(self, key)
      if len(value) != blocks_n or any(b != name for b in value):
        raise ValueError(f"VAEConfig: {key}={value!r} is not supported ({name} per "
                         "block_out_channels entry)")
    for key in ("sample_size", "layers_per_block", "norm_num_groups"):
      if not isinstance(getattr(self, key), int):
        raise ValueError(f"VAEConfig: {key}={getattr(self, key)!r} is not supported (an int)")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
    """From a diffusers AutoencoderKL (or FlaxAutoencoderKL) config.json; other keys
    ignored, unsupported values raise ValueError naming the key."""
    return blocks.read_config(cls, config, _FIXED)

  def to_dict(self) -> dict:
    """A config.json that PyTorch diffusers' AutoencoderKL reads."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.39.0", "act_fn": "silu",
            **out}


class SelfAttention2D(nn.Module):
  """GroupNorm, one-head self-attention over the H x W positions (query, key, value,
  proj_attn, all with bias), + input."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = nn.GroupNorm(self.groups, epsilon=EPS, name="group_norm")(x)
    h = h.reshape(batch, height * width, 1, channels)  # [B, HW, 1 head, C]
    dense = lambda name: nn.Dense(channels, dtype=self.dtype, name=name)
    h = dot_product_attention(dense("query")(h), dense("key")(h), dense("value")(h))
    h = dense("proj_attn")(h.reshape(batch, height * width, channels))
    return h.reshape(x.shape) + x


class MidBlock(nn.Module):
  """ResNet, self-attention, ResNet (at the lowest resolution)."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    resnet = lambda name: blocks.ResnetBlock2D(x.shape[-1], self.groups, EPS, self.dtype,
                                               name=name)
    x = resnet("resnets_0")(x)
    x = SelfAttention2D(self.groups, self.dtype, name="attentions_0")(x)
    return resnet("resnets_1")(x)


class ResnetStack(nn.Module):
  """`layers` ResNet blocks, then the encoder's downsampler or the decoder's upsampler
  (`resample`: "down", "up" or None)."""
  channels: int
  layers: int
  groups: int
  resample: str | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = blocks.ResnetBlock2D(self.channels, self.groups, EPS, self.dtype,
                               name=f"resnets_{i}")(x)
    if self.resample == "down":
      x = blocks.Downsample2D(self.channels, pad_end=True, dtype=self.dtype,
                              name="downsamplers_0")(x)
    elif self.resample == "up":
      x = blocks.Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


def _head(config: VAEConfig, features: int, dtype, x):
  """GroupNorm, SiLU, 3x3 conv: how the encoder and decoder end."""
  x = nn.GroupNorm(config.norm_num_groups, epsilon=EPS, name="conv_norm_out")(x)
  return blocks.conv(features, 3, dtype, "conv_out")(nn.silu(x))


class Encoder(nn.Module):
  """Images [B, H, W, C_in] -> latent moments [B, h, w, 2 latent_channels]."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    config = self.config
    channels = config.block_out_channels
    x = blocks.conv(channels[0], 3, self.dtype, "conv_in")(x)
    for i, width in enumerate(channels):
      resample = "down" if i < len(channels) - 1 else None
      x = ResnetStack(width, config.layers_per_block, config.norm_num_groups, resample,
                      self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(config.norm_num_groups, self.dtype, name="mid_block")(x)
    return _head(config, 2 * config.latent_channels, self.dtype, x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, H, W, C_out]."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    config = self.config
    channels = tuple(reversed(config.block_out_channels))
    x = blocks.conv(channels[0], 3, self.dtype, "conv_in")(x)
    x = MidBlock(config.norm_num_groups, self.dtype, name="mid_block")(x)
    for i, width in enumerate(channels):
      resample = "up" if i < len(channels) - 1 else None
      x = ResnetStack(width, config.layers_per_block + 1, config.norm_num_groups, resample,
                      self.dtype, name=f"up_blocks_{i}")(x)
    return _head(config, config.out_channels, self.dtype, x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `encode` images to the latent distribution, `decode` latents."""
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    latent = self.config.latent_channels
    self.encoder = Encoder(self.config, self.dtype)
    self.quant_conv = nn.Conv(2 * latent, (1, 1), padding="VALID", dtype=self.dtype)
    self.post_quant_conv = nn.Conv(latent, (1, 1), padding="VALID", dtype=self.dtype)
    self.decoder = Decoder(self.config, self.dtype)

  def encode(self, images):
    """Images [B, H, W, C_in] in [-1, 1] -> (mean, std), each [B, h, w, latent_channels],
    unscaled; log-variance clipped to [-30, 20] as diffusers does."""
    moments = self.quant_conv(self.encoder(images))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    """Unscaled latents [B, h, w, latent_channels] -> images [B, H, W, C_out] (not clipped)."""
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, images):
    """Decoding of the latent mean of `images` (touches every parameter: for init)."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def param_shapes(module: AutoencoderKL) -> dict:
  """Abstract params (ShapeDtypeStructs) of `module`, nothing allocated."""
  config = module.config
  size = 2 ** (len(config.block_out_channels) - 1)
  images = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)["params"]
