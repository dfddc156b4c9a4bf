"""The ViT encoder (transformers' ViTModel without its pooler, e.g. DINO) in flax.linen.

    ViTModel(ViTConfig.from_dict(config_json), dtype)
        .apply({"params": p}, pixels [B, S, S, C] normalized, NHWC)
        -> last_hidden_state [B, 1 + P, D] after the final `layernorm`

Parameter names are those of transformers' (< 5) FlaxViTModel(add_pooling_layer=False):
`embeddings/{cls_token, patch_embeddings/projection, position_embeddings}`,
`encoder/layer/<i>/{attention/{attention/{query,key,value}, output/dense},
intermediate/dense, output/dense, layernorm_before, layernorm_after}`, `layernorm`.
Numbers are those of the PyTorch ViTModel (exact GELU by default; dropout never applied).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.nn.attention import dot_product_attention, merge_heads, split_heads
from hdb_jax.nn.clip import ACTIVATIONS, Encoder, check_common, layer_norm, read_config


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The keys of a transformers ViTConfig (config.json) that define the encoder, with
  its defaults. Pooler keys are ignored (no pooler)."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True

  def __post_init__(self):
    check_common(self)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> ViTConfig:
    """From a ViTModel (or ViTForImageClassification) config.json."""
    return read_config(cls, config)

  def to_dict(self) -> dict:
    """A config.json that transformers' ViTModel reads."""
    return {"architectures": ["ViTModel"], "model_type": "vit", **dataclasses.asdict(self)}


class _Dense(nn.Module):
  """A Dense named `dense` in a module of its own (transformers' nesting: `output/dense`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


class ViTSelfAttention(nn.Module):
  """query, key, value (biases if `qkv_bias`) -> heads merged [B, L, D] (no output dense)."""
  config: ViTConfig
  dtype: Any = jnp.float32
  attention: str = "xla"  # the kernel (hdb_jax/nn/attention.py)

  @nn.compact
  def __call__(self, x):
    config = self.config
    dense = lambda name: nn.Dense(config.hidden_size, use_bias=config.qkv_bias,
                                  dtype=self.dtype, name=name)
    heads = config.num_attention_heads
    q = split_heads(dense("query")(x), heads)  # [B, L, H, D / H]
    k = split_heads(dense("key")(x), heads)
    v = split_heads(dense("value")(x), heads)
    return merge_heads(dot_product_attention(q, k, v, implementation=self.attention))


class ViTAttention(nn.Module):
  """`attention` (self-attention) then `output/dense`."""
  config: ViTConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    h = ViTSelfAttention(self.config, self.dtype, self.attention, name="attention")(x)
    return _Dense(self.config.hidden_size, self.dtype, name="output")(h)


class ViTLayer(nn.Module):
  """Pre-LayerNorm self-attention and MLP (`intermediate`, `output`), with residuals."""
  config: ViTConfig
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    config, dtype = self.config, self.dtype
    x = x + ViTAttention(config, dtype, self.attention, name="attention")(
        layer_norm(config, dtype, "layernorm_before")(x))
    h = layer_norm(config, dtype, "layernorm_after")(x)
    h = _Dense(config.intermediate_size, dtype, name="intermediate")(h)
    h = ACTIVATIONS[config.hidden_act](h)
    return x + _Dense(config.hidden_size, dtype, name="output")(h)


class ViTPatchEmbeddings(nn.Module):
  """`projection`: a strided conv (with bias) -> patches [B, P, D], row-major."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    patch = self.config.patch_size
    x = nn.Conv(self.config.hidden_size, (patch, patch), strides=(patch, patch),
                padding="VALID", dtype=self.dtype, name="projection")(pixels)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class ViTEmbeddings(nn.Module):
  """[cls_token, patch embeddings] + position_embeddings."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    config = self.config
    size, width = config.image_size, config.hidden_size
    if tuple(pixels.shape[1:]) != (size, size, config.num_channels):
      raise ValueError(f"pixels {tuple(pixels.shape)}: the ViT takes "
                       f"[B, {size}, {size}, {config.num_channels}]")
    init = nn.initializers.truncated_normal(config.initializer_range)
    cls_token = self.param("cls_token", init, (1, 1, width))
    positions = self.param("position_embeddings", init, (1, config.num_patches + 1, width))
    patches = ViTPatchEmbeddings(config, self.dtype, name="patch_embeddings")(pixels)
    cls = jnp.broadcast_to(cls_token, (pixels.shape[0], 1, width)).astype(patches.dtype)
    return jnp.concatenate([cls, patches], axis=1) + positions  # [B, 1 + P, D]


class ViTModel(nn.Module):
  """pixels [B, S, S, C] (normalized) -> last_hidden_state [B, 1 + P, D] (after
  `layernorm`; the CLS token is row 0)."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    config, dtype = self.config, self.dtype
    x = ViTEmbeddings(config, dtype, name="embeddings")(pixels)
    x = Encoder(ViTLayer, config, "layer", dtype, name="encoder")(x)
    return layer_norm(config, dtype, "layernorm")(x)


def param_shapes(module: ViTModel) -> dict:
  """Abstract params (ShapeDtypeStructs) of `module`, nothing allocated."""
  config = module.config
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), pixels)["params"]
