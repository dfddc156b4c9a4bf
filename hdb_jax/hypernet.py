"""HyperNetwork: one face image -> LiDB train weights (HyperDreamBooth, docs/method.md).

    layout = hypernet.weight_layout(spec)
    net = hypernet.HyperNetwork(layout, encoder=hypernet.ViT(...), width=128, depth=4)
    variables = net.init(rng, images, iterations=1)
    train = net.apply(variables, images, iterations=4)   # the lidb train pytree, [B, ...]

An image encoder (a ViT, or a pretrained CLIP vision tower wrapped by hdb_jax/models.py)
turns the image into tokens **once**. The weights are predicted iteratively: theta_0 = 0
and theta_k = theta_{k-1} + head(decoder(image_tokens, theta_{k-1})). The decoder sees
one *weight token* per LiDB layer (its flattened [D_train, U_train] projected to the
model width, plus a learned layer embedding), runs self-attention over the weight tokens
and cross-attention to the image tokens, and the head maps each token back to its
layer's values.

Layers of different sizes: a LiDB layer holds r * (a + b) values, with a, b clamped to
the layer (`lidb.LiDBSpec.dims`). Layers are grouped by that size (`weight_layout`);
each group has its own input projection and output head, the decoder is shared. No
value is padded: SD1.5 at a = 100, b = 50 has one group of 176 layers x 150 values; the
mini world has 3 groups (64, 96 and 114 values).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import files, lidb, weights_dataset
from hdb_jax import params as params_lib

HEAD_INIT_STD = 1e-3  # the output head starts small: theta_1 ~ 0, like a LiDB init
# Key of the learned aux matrices in a hypernetwork's params (config hypernet.learnable_aux:
# one aux pytree shared by all identities, trained with the network).
AUX_KEY = "lidb_aux"


# ------------------------------------------------------------------------------------
# Weight tokens: LiDB train pytree <-> one flat token per layer, grouped by size

@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """Which LiDB layer is which weight token.

  layers: ((component, layer path, a, b), ...) in spec order; groups: ((token size,
  (layer indices...)), ...) by increasing size; rank: r.
  """
  layers: tuple[tuple[str, str, int, int], ...]
  groups: tuple[tuple[int, tuple[int, ...]], ...]
  rank: int

  @property
  def num_layers(self) -> int:
    return len(self.layers)


def weight_layout(spec: lidb.LiDBSpec) -> WeightLayout:
  layers = []
  for component in sorted(spec.layers):
    for layer, (in_dim, out_dim) in sorted(spec.layers[component].items()):
      a, b = spec.dims(in_dim, out_dim)
      layers.append((component, layer, a, b))
  sizes = sorted({spec.rank * (a + b) for _, _, a, b in layers})
  groups = tuple((size, tuple(i for i, (_, _, a, b) in enumerate(layers)
                              if spec.rank * (a + b) == size)) for size in sizes)
  return WeightLayout(tuple(layers), groups, spec.rank)


def to_tokens(train, layout: WeightLayout) -> list[jax.Array]:
  """Train pytree (leaves [..., a, r] / [..., r, b]) -> per group [..., L_g, size_g]."""
  tokens = []
  for _, indices in layout.groups:
    rows = []
    for i in indices:
      component, layer, _, _ = layout.layers[i]
      w = train[component][layer]
      lead = w["D_train"].shape[:-2]
      rows.append(jnp.concatenate([w["D_train"].reshape(lead + (-1,)),
                                   w["U_train"].reshape(lead + (-1,))], axis=-1))
    tokens.append(jnp.stack(rows, axis=-2))
  return tokens


def from_tokens(tokens: Sequence[jax.Array], layout: WeightLayout) -> dict:
  """Inverse of `to_tokens`: per group [..., L_g, size_g] -> train pytree."""
  train: dict[str, dict[str, Any]] = {}
  r = layout.rank
  for (_, indices), group in zip(layout.groups, tokens):
    lead = group.shape[:-2]
    for position, i in enumerate(indices):
      component, layer, a, b = layout.layers[i]
      token = group[..., position, :]
      train.setdefault(component, {})[layer] = {
          "D_train": token[..., :a * r].reshape(lead + (a, r)),
          "U_train": token[..., a * r:].reshape(lead + (r, b))}
  return train


def zeros(layout: WeightLayout, batch: int) -> list[jax.Array]:
  """theta_0: zero tokens per group [batch, L_g, size_g]."""
  return [jnp.zeros((batch, len(indices), size), jnp.float32) for size, indices in layout.groups]


# ------------------------------------------------------------------------------------
# Modules

class MLP(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(nn.gelu(x, approximate=False))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: self-attention, MLP."""
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attn")(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    return x + MLP(self.mlp_ratio * x.shape[-1], self.dtype, name="mlp")(y)


class ViT(nn.Module):
  """A small Vision Transformer: images [B, H, W, 3] in [-1, 1] -> tokens [B, N, width]
  (N = (H / patch)^2 patch tokens + 1 class token). Trained from scratch in the mini world."""
  patch: int = 4
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, name="patch_embed")(images)
    batch, height, width, _ = x.shape
    x = x.reshape(batch, height * width, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], 1)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(x)
    return nn.LayerNorm(dtype=self.dtype, name="ln_out")(x)


class DecoderBlock(nn.Module):
  """Pre-LN block over weight tokens: self-attention, cross-attention to the image
  tokens, MLP."""
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, weight_tokens, image_tokens):
    x = weight_tokens
    y = nn.LayerNorm(dtype=self.dtype, name="ln_self")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="self_attn")(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_cross")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype,
                                            name="cross_attn")(y, image_tokens)
    y = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    return x + MLP(self.mlp_ratio * x.shape[-1], self.dtype, name="mlp")(y)


class HyperNetwork(nn.Module):
  """Image -> LiDB train pytree (leaves [B, ...]) in `iterations` refinement steps.

  encoder: a module mapping images [B, H, W, 3] in [-1, 1] to tokens [B, N, D] (`ViT`,
  or `models.ClipVisionTokens` for a pretrained CLIP vision tower).
  """
  layout: WeightLayout
  encoder: nn.Module
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  def setup(self):
    self.image_proj = nn.Dense(self.width, dtype=self.dtype)
    self.image_norm = nn.LayerNorm(dtype=self.dtype)
    self.token_in = [nn.Dense(self.width, dtype=self.dtype, name=f"token_in_{size}")
                     for size, _ in self.layout.groups]
    self.heads_out = [nn.Dense(size, dtype=jnp.float32, name=f"head_{size}",
                               kernel_init=nn.initializers.normal(HEAD_INIT_STD),
                               bias_init=nn.initializers.zeros)
                      for size, _ in self.layout.groups]
    self.layer_embed = self.param("layer_embed", nn.initializers.normal(0.02),
                                  (self.layout.num_layers, self.width))
    self.blocks = [DecoderBlock(self.heads, self.mlp_ratio, self.dtype, name=f"block_{i}")
                   for i in range(self.depth)]
    self.out_norm = nn.LayerNorm(dtype=self.dtype)

  def encode(self, images):
    """Images [B, H, W, 3] in [-1, 1] -> image tokens [B, N, width] (once per image)."""
    return self.image_norm(self.image_proj(self.encoder(images)))

  def refine(self, image_tokens, tokens):
    """One iteration: tokens per group [B, L_g, size_g] -> the update of each."""
    embedded = [self.token_in[g](t.astype(self.dtype)) for g, t in enumerate(tokens)]
    order = [i for _, indices in self.layout.groups for i in indices]  # layer of each row
    x = jnp.concatenate(embedded, axis=1) + self.layer_embed[jnp.array(order)][None]
    for block in self.blocks:
      x = block(x, image_tokens)
    x = self.out_norm(x)
    updates, start = [], 0
    for g, (_, indices) in enumerate(self.layout.groups):
      updates.append(self.heads_out[g](x[:, start:start + len(indices)].astype(jnp.float32)))
      start += len(indices)
    return updates

  def predict_tokens(self, image_tokens, iterations: int):
    """theta_0 = 0; theta_k = theta_{k-1} + head(decoder(image_tokens, theta_{k-1}))."""
    tokens = zeros(self.layout, image_tokens.shape[0])
    for _ in range(iterations):
      tokens = [t + u for t, u in zip(tokens, self.refine(image_tokens, tokens))]
    return tokens

  def __call__(self, images, iterations: int = 4):
    return from_tokens(self.predict_tokens(self.encode(images), iterations), self.layout)


def make_encoder(encoder_cfg):
  """The image encoder of a config -> (module, pretrained params or None, its config).

  kind "vit" (default): a `ViT` trained from scratch (patch, width, depth, heads).
  kind "clip": a pretrained CLIP vision tower read from the local folder `path`
  (hdb_jax/models.py); its params go into the hypernetwork's params["encoder"].
  """
  kind = encoder_cfg.get("kind", "vit")
  if kind == "vit":
    return ViT(patch=encoder_cfg.patch, width=encoder_cfg.width, depth=encoder_cfg.depth,
               heads=encoder_cfg.heads, mlp_ratio=encoder_cfg.get("mlp_ratio", 4),
               dtype=jnp.dtype(encoder_cfg.get("dtype", "float32"))), None, None
  if kind == "clip":
    from hdb_jax import models
    if not encoder_cfg.get("path"):
      raise ValueError("hypernet.encoder.kind='clip' needs hypernet.encoder.path: a local "
                       "CLIP vision model folder")
    return models.load_vision_encoder(encoder_cfg.path, encoder_cfg.get("dtype", "float32"))
  raise ValueError(f"hypernet.encoder.kind must be 'vit' or 'clip', got {kind!r}")


def make(layout: WeightLayout, cfg, encoder: nn.Module | None = None) -> HyperNetwork:
  """The hypernetwork of a config (`cfg.width, depth, heads, mlp_ratio`); the encoder
  from `make_encoder(cfg.encoder)` when not given."""
  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  if encoder is None:
    encoder, _, _ = make_encoder(cfg.encoder)
  return HyperNetwork(layout, encoder, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                      mlp_ratio=cfg.get("mlp_ratio", 4), dtype=dtype)


def aux_params(aux, layout: WeightLayout) -> dict:
  """An aux pytree -> its params form {layer index: {"D_aux", "U_aux"}} (layout order):
  layer paths hold "/", which the hypernetwork's flat file keys use as separator."""
  return {str(i): dict(aux[component][layer])
          for i, (component, layer, _, _) in enumerate(layout.layers)}


def split_aux(params, layout: WeightLayout) -> tuple[dict, dict | None]:
  """Hypernetwork params -> (the network's params, learned aux pytree or None)."""
  net_params = {k: v for k, v in params.items() if k != AUX_KEY}
  if AUX_KEY not in params:
    return net_params, None
  aux = {}
  for i, (component, layer, _, _) in enumerate(layout.layers):
    aux.setdefault(component, {})[layer] = params[AUX_KEY][str(i)]
  return net_params, aux


def weight_loss(predicted, target) -> jax.Array:
  """Mean squared error over all LiDB values, per example [B] (the paper's
  ||theta_hat - theta||^2, normalized by the number of values)."""
  squares = jax.tree_util.tree_map(lambda p, t: jnp.sum(
      (p - t) ** 2, axis=tuple(range(1, p.ndim))), predicted, target)
  count = sum(x[0].size for x in jax.tree_util.tree_leaves(target))
  return sum(jax.tree_util.tree_leaves(squares)) / count


# ------------------------------------------------------------------------------------
# Files: <dir>/hypernet.safetensors (params) + <dir>/hypernet.json (config, LiDB spec)

WEIGHTS_FILE, INFO_FILE = "hypernet.safetensors", "hypernet.json"
FORMAT = "hdb-hypernet"


def save(path: str, params, net_config, spec: lidb.LiDBSpec, base_fingerprint: str,
         prompt: str, extra: dict | None = None, provenance: dict | None = None) -> None:
  """Write a trained hypernetwork folder atomically: all its params (a pretrained encoder's
  too, frozen or not) and, in hypernet.json, what rebuilds it (`extra` carries the
  encoder_config of a CLIP encoder, the image size, ...); `provenance`
  (hdb_jax/provenance.py) goes to provenance.json with the weights' fingerprint."""
  import safetensors.numpy
  flat = {k: np.asarray(v, np.float32) for k, v in params_lib.flatten(params).items()}
  config = net_config.to_dict() if hasattr(net_config, "to_dict") else dict(net_config)
  info = {"format": FORMAT, "version": "1", "hypernet": config,
          "lidb_spec": json.loads(weights_dataset.spec_to_json(spec)),
          "base_fingerprint": base_fingerprint, "prompt": prompt, **(extra or {})}
  with files.atomic_dir(path) as tmp:
    safetensors.numpy.save_file(flat, os.path.join(tmp, WEIGHTS_FILE),
                                metadata={"format": FORMAT})
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
    if provenance is not None:
      from hdb_jax import provenance as provenance_lib
      provenance_lib.write(tmp, dict(provenance, fingerprint=weights_fingerprint(tmp)))


def read(path: str) -> tuple[dict, dict]:
  """A hypernetwork folder -> (params, info), checked, without building the network
  (info["lidb_spec"] is a LiDBSpec, info["fingerprint"] the weights file's hash)."""
  import safetensors.numpy
  info_path, weights_path = os.path.join(path, INFO_FILE), os.path.join(path, WEIGHTS_FILE)
  for needed in (info_path, weights_path):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"{needed}: missing (not a hypernetwork folder)")
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{info_path}: not readable JSON ({e})") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"{info_path}: not a hypernetwork (format={info.get('format')!r})")
  spec = weights_dataset.spec_from_json(json.dumps(info["lidb_spec"]), info_path)
  try:
    params = params_lib.unflatten(safetensors.numpy.load_file(weights_path))
  except Exception as e:
    raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
  return params, dict(info, lidb_spec=spec, fingerprint=weights_fingerprint(path))


def weights_fingerprint(path: str) -> str:
  """A hypernetwork folder's fingerprint: sha256 of its weights file (16 hex digits), as
  predicted LiDB files, personalizations and evaluation summaries record it."""
  with open(os.path.join(path, WEIGHTS_FILE), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def load(path: str, encoder: nn.Module | None = None):
  """A hypernetwork folder -> (net, params, info). Checks it fully."""
  import ml_collections
  params, info = read(path)
  net_config = ml_collections.ConfigDict(info["hypernet"])
  if encoder is None and net_config.encoder.get("kind", "vit") == "clip":
    from hdb_jax import models  # the architecture is stored; the weights are in the file
    encoder = models.vision_encoder_from_config(info["encoder_config"],
                                                net_config.encoder.get("dtype", "float32"))
  return make(weight_layout(info["lidb_spec"]), net_config, encoder), params, info


def predict_file(hypernet_dir: str, image_path: str, out: str,
                 iterations: int | None = None, scale: float = 1.0) -> dict:
  """One face photo -> a LiDB file (`lidb.load`-able), by the hypernetwork alone.

  The image is center-cropped and resized to the hypernetwork's image size; `iterations`
  defaults to the number it was trained with; every predicted residual is multiplied by
  `scale` (`personalize.prediction_scale`: 1.5 on the mini world's network gains identity
  within a point of context, docs/results.md). The file's metadata records the source
  (`hypernet`), the hypernetwork folder's fingerprint, the iterations, the scale and the
  prompt.
  """
  net, params, info = load(hypernet_dir)
  params, learned_aux = split_aux(params, net.layout)
  iterations = int(info["hypernet"]["iterations"] if iterations is None else iterations)
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  image = files.read_image(image_path, int(info["image_size"]))[None]    # [1, S, S, 3]
  predicted = jax.jit(lambda p, x: net.apply({"params": p}, x, iterations=iterations))(
      params, image)
  train = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), predicted)
  if scale != 1.0:
    train = lidb.scale_residuals(train, scale)
  token, _, class_name = info["prompt"].removeprefix("a ").partition(" ")
  lidb.save(out, train, info["lidb_spec"], info["base_fingerprint"], extra_metadata={
      "source": "hypernet", "hypernet": os.path.basename(os.path.normpath(hypernet_dir)),
      "hypernet_fingerprint": info["fingerprint"],
      "iterations": str(iterations), "scale": str(float(scale)),
      "prompt": info["prompt"], "token": token,
      "class_name": class_name, "image": os.path.basename(image_path)}, aux=learned_aux)
  return {"out": out, "iterations": iterations, "scale": float(scale),
          "values": info["lidb_spec"].num_trainable}
