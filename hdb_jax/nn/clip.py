"""CLIP (transformers' CLIPTextModel, CLIPVisionModel, CLIPModel) in flax.linen.

    CLIPTextModel(CLIPTextConfig.from_dict(config_json), dtype).apply({"params": p},
        input_ids [B, L], attention_mask [B, L] or None) -> (last_hidden_state [B, L, D]
        after the final layer norm, pooled [B, D] at EOS)
    CLIPVisionModel(CLIPVisionConfig.from_dict(config_json), dtype).apply({"params": p},
        pixels [B, S, S, C] normalized, NHWC) -> (last_hidden_state [B, 1 + P, D] before
        the post layer norm, pooled [B, D])
    CLIPModel(CLIPConfig.from_dict(config_json), dtype): `image_features(pixels)`,
        `text_features(input_ids, attention_mask)` -> projections [B, E] (not unit length)

Parameter trees are those of transformers' (< 5) FlaxCLIPTextModel, FlaxCLIPVisionModule
and FlaxCLIPModel; every submodule is named, so a module's path equals its parameter path
(LiDB intercepts the `nn.Dense` calls `text_model/encoder/layers/<i>/self_attn/q_proj`...
by path). Numbers are the PyTorch models'; the EOS position is found as transformers does
today (the largest id if `eos_token_id` is 2, as in configs from before its fix; else the
first `eos_token_id`). Dropout is never applied.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.nn import blocks
from hdb_jax.nn.attention import dot_product_attention, merge_heads, projections, split_heads

# transformers' `hidden_act` names -> functions (`gelu`: exact, erf).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def check_common(config) -> None:
  """The checks every transformer config here needs: known activation, heads dividing
  the width. Raises ValueError naming the key."""
  name = type(config).__name__
  if config.hidden_act not in ACTIVATIONS:
    raise ValueError(f"{name}: hidden_act={config.hidden_act!r} is not supported "
                     f"(supported: {', '.join(ACTIVATIONS)})")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"{name}: hidden_size={config.hidden_size} does not split into "
                     f"num_attention_heads={config.num_attention_heads} heads")


def read_config(cls, config: Mapping[str, Any]):
  """`cls` from a transformers config.json dict: its fields are read, other keys ignored;
  an image_size or patch_size [n, n] is read as n (square only)."""
  config = dict(config)
  for key in ("image_size", "patch_size"):
    value = config.get(key)
    if isinstance(value, (list, tuple)):
      if len(value) != 2 or value[0] != value[1]:
        raise ValueError(f"{cls.__name__}: {key}={value!r} is not supported (square only)")
      config[key] = value[0]
  return blocks.read_config(cls, config, {})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The keys of a transformers CLIPTextConfig (config.json), with its defaults."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    check_common(self)
    if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
      raise ValueError(f"CLIPTextConfig: eos_token_id={self.eos_token_id!r} is not "
                       "supported (one int)")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
    """From a CLIPTextModel config.json, or the `text_config` of a CLIPModel's."""
    if "text_config" in config or "text_config_dict" in config:
      config = _sub_config(config, "text_config")
    return read_config(cls, config)

  def to_dict(self) -> dict:
    """A config.json that transformers' CLIPTextModel reads."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The keys of a transformers CLIPVisionConfig (config.json), with its defaults."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0

  def __post_init__(self):
    check_common(self)

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
    """From a CLIPVisionModel config.json, or the `vision_config` of a CLIPModel's."""
    if "vision_config" in config or "vision_config_dict" in config:
      config = _sub_config(config, "vision_config")
    return read_config(cls, config)

  def to_dict(self) -> dict:
    """A config.json that transformers' CLIPVisionModel reads."""
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A transformers CLIPConfig: both towers and the shared projection."""
  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  initializer_factor: float = 1.0

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> CLIPConfig:
    """From a CLIPModel config.json (`text_config`, `vision_config`, and the older
    `text_config_dict` / `vision_config_dict` overrides)."""
    top = {k: config[k] for k in ("projection_dim", "logit_scale_init_value",
                                  "initializer_factor") if k in config}
    return cls(CLIPTextConfig.from_dict(_sub_config(config, "text_config")),
               CLIPVisionConfig.from_dict(_sub_config(config, "vision_config")), **top)

  def to_dict(self) -> dict:
    """A config.json that transformers' CLIPModel reads."""
    towers = {key: {k: v for k, v in getattr(self, key).to_dict().items() if k != "architectures"}
              for key in ("text_config", "vision_config")}
    return {**dataclasses.asdict(self), **towers, "architectures": ["CLIPModel"],
            "model_type": "clip"}


def _sub_config(config: Mapping[str, Any], key: str) -> dict:
  """config[key] updated with config[key + "_dict"] (older CLIP config files)."""
  return {**(config.get(key) or {}), **(config.get(f"{key}_dict") or {})}


# ------------------------------------------------------------------------------------
# The transformer encoder (CLIP's; ViT reuses `Encoder`)

class Encoder(nn.Module):
  """`<list_name>/<i>`: the config's `num_hidden_layers` layers, applied in order
  (`encoder/layers/<i>` in CLIP, `encoder/layer/<i>` in ViT). The numbered layers sit
  one level down, in an Encoder named `list_name` whose own `list_name` is None.
  `attention`: the kernel (hdb_jax/nn/attention.py); `remat`: each layer rematerialized
  in the backward pass (hdb_jax/nn/blocks.py REMAT)."""
  layer: Any  # a module class taking (config, dtype, attention, name=); called as (x, mask)
  config: Any
  list_name: str | None
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, mask=None):
    if self.list_name:
      return Encoder(self.layer, self.config, None, self.dtype, self.attention, self.remat,
                     name=self.list_name)(x, mask)
    layer = blocks.rematerialized(self.layer, self.remat)
    for i in range(self.config.num_hidden_layers):
      x = layer(self.config, self.dtype, self.attention, name=str(i))(x, mask)
    return x


def layer_norm(config, dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                      name=name)


class CLIPAttention(nn.Module):
  """Multi-head self-attention: q_proj, k_proj, v_proj, out_proj (with biases)."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"  # the kernel (hdb_jax/nn/attention.py)

  @nn.compact
  def __call__(self, x, mask=None):
    # x [B, L, D]; mask broadcastable to [B, H, L, L], True = attend
    width, heads = self.config.hidden_size, self.config.num_attention_heads
    projected = projections(self, {"q_proj": x, "k_proj": x, "v_proj": x}, width,
                            use_bias=True, dtype=self.dtype)
    q = split_heads(projected["q_proj"], heads)  # [B, L, H, D / H]
    k = split_heads(projected["k_proj"], heads)
    v = split_heads(projected["v_proj"], heads)
    out = dot_product_attention(q, k, v, mask, implementation=self.attention)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(merge_heads(out))


class CLIPMLP(nn.Module):
  """fc1, activation, fc2."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = ACTIVATIONS[self.config.hidden_act](h)
    return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm self-attention and MLP, each with a residual."""
  config: Any
  dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None):
    config, dtype = self.config, self.dtype
    x = x + CLIPAttention(config, dtype, self.attention, name="self_attn")(
        layer_norm(config, dtype, "layer_norm1")(x), mask)
    return x + CLIPMLP(config, dtype, name="mlp")(layer_norm(config, dtype, "layer_norm2")(x))


# ------------------------------------------------------------------------------------
# Text

class CLIPTextEmbeddings(nn.Module):
  """Token plus position embeddings (positions 0 .. L - 1)."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    config, init = self.config, nn.initializers.normal(0.02)
    tokens = nn.Embed(config.vocab_size, config.hidden_size, embedding_init=init,
                      name="token_embedding")(input_ids)  # [B, L, D]
    positions = nn.Embed(config.max_position_embeddings, config.hidden_size,
                         embedding_init=init, name="position_embedding")(
                             jnp.arange(input_ids.shape[-1]))  # [L, D]
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """input_ids [B, L] (L <= max_position_embeddings), attention_mask [B, L] (1 = token,
  0 = padding; None: all tokens) -> (last_hidden_state [B, L, D], pooled [B, D]).
  Causal self-attention that also skips padded keys."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: str = "xla"  # hdb_jax/nn/attention.py IMPLEMENTATIONS
  remat: str = "none"     # hdb_jax/nn/blocks.py REMAT: per encoder layer

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    config = self.config
    batch, length = input_ids.shape
    if length > config.max_position_embeddings:
      raise ValueError(f"{length} tokens, more than the text model's "
                       f"max_position_embeddings={config.max_position_embeddings}")
    x = CLIPTextEmbeddings(config, name="embeddings")(input_ids)  # [B, L, D]
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]  # [1, 1, L, L]
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]  # [B, 1, L, L]
    x = Encoder(CLIPEncoderLayer, config, "layers", self.dtype, self.attention, self.remat,
                name="encoder")(x, mask)
    x = layer_norm(config, self.dtype, "final_layer_norm")(x)
    # EOS: the first `eos_token_id`, or the largest id in configs from before transformers'
    # fix (eos_token_id 2), as transformers finds it
    eos = jnp.argmax(input_ids if config.eos_token_id == 2 else input_ids == config.eos_token_id,
                     axis=-1)  # [B]
    return x, x[jnp.arange(batch), eos]  # [B, L, D], pooled [B, D]


class CLIPTextModel(nn.Module):
  """CLIPTextTransformer under `text_model` (transformers' FlaxCLIPTextModel params)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):
    return CLIPTextTransformer(self.config, self.dtype, self.attention, self.remat,
                               name="text_model")(input_ids, attention_mask)


# ------------------------------------------------------------------------------------
# Vision

class CLIPVisionEmbeddings(nn.Module):
  """[class_embedding, patch embeddings (strided conv, no bias)] + position embeddings."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    config = self.config
    size, patch, width = config.image_size, config.patch_size, config.hidden_size
    if tuple(pixels.shape[1:]) != (size, size, config.num_channels):
      raise ValueError(f"pixels {tuple(pixels.shape)}: the CLIP vision model takes "
                       f"[B, {size}, {size}, {config.num_channels}]")
    class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (width,))
    patches = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                      use_bias=False, dtype=self.dtype, name="patch_embedding")(pixels)
    patches = patches.reshape(pixels.shape[0], -1, width)  # [B, P, D], row-major patches
    cls = jnp.broadcast_to(class_embedding, (pixels.shape[0], 1, width))
    x = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1)  # [B, 1 + P, D]
    count = (size // patch) ** 2 + 1
    positions = nn.Embed(count, width, embedding_init=nn.initializers.normal(0.02),
                         name="position_embedding")(jnp.arange(count))  # [1 + P, D]
    return x + positions[None]


class CLIPVisionTransformer(nn.Module):
  """pixels [B, S, S, C] (normalized) -> (last_hidden_state [B, 1 + P, D], as the
  encoder leaves it; pooled [B, D] = post_layernorm of the class token)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    config, dtype = self.config, self.dtype
    x = CLIPVisionEmbeddings(config, dtype, name="embeddings")(pixels)
    x = layer_norm(config, dtype, "pre_layrnorm")(x)  # sic: transformers' name
    x = Encoder(CLIPEncoderLayer, config, "layers", dtype, name="encoder")(x)
    return x, layer_norm(config, dtype, "post_layernorm")(x[:, 0])


class CLIPVisionModel(nn.Module):
  """CLIPVisionTransformer under `vision_model` (transformers' FlaxCLIPVisionModule)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    return CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(pixels)


# ------------------------------------------------------------------------------------
# Both, projected

class CLIPModel(nn.Module):
  """Both towers, their projections to `projection_dim` (no bias) and `logit_scale`."""
  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    config = self.config
    self.text_model = CLIPTextTransformer(config.text_config, self.dtype)
    self.vision_model = CLIPVisionTransformer(config.vision_config, self.dtype)
    self.visual_projection = nn.Dense(config.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = nn.Dense(config.projection_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(config.logit_scale_init_value), ())

  def image_features(self, pixels):
    """pixels [B, S, S, C] (normalized) -> image embeddings [B, E] (not unit length)."""
    return self.visual_projection(self.vision_model(pixels)[1])

  def text_features(self, input_ids, attention_mask=None):
    """input_ids, attention_mask [B, L] -> text embeddings [B, E] (not unit length)."""
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])

  def __call__(self, input_ids, pixels, attention_mask=None):
    """-> logits_per_image [B_img, B_txt]: exp(logit_scale) x cosine similarity."""
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    image = unit(self.image_features(pixels))
    text = unit(self.text_features(input_ids, attention_mask))
    return jnp.exp(self.logit_scale) * image @ text.T


def param_shapes(module: nn.Module) -> dict:
  """Abstract params (ShapeDtypeStructs) of CLIPTextModel, CLIPVisionModel, CLIPModel
  (or a bare text / vision transformer), nothing allocated."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  pixels = lambda c: jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels),
                                          jnp.float32)
  if isinstance(module, (CLIPTextModel, CLIPTextTransformer)):
    inputs = (ids,)
  elif isinstance(module, (CLIPVisionModel, CLIPVisionTransformer)):
    inputs = (pixels(module.config),)
  elif isinstance(module, CLIPModel):
    inputs = (ids, pixels(module.config.vision_config))
  else:
    raise TypeError(f"param_shapes: {type(module).__name__} is not a CLIP module")
  return jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), *inputs)["params"]
