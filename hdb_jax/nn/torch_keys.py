"""PyTorch state-dict keys and arrays <-> our Flax parameter paths and arrays.

One key map for every model hdb-jax reads or writes in PyTorch format, with no torch,
diffusers or transformers import:

  component        PyTorch model (its checkpoint files)       our Flax tree
  unet             diffusers UNet2DConditionModel              hdb_jax/nn/unet.py
  vae              diffusers AutoencoderKL                     hdb_jax/nn/vae.py
  text_encoder     transformers CLIPTextModel                  text_model/...
  vision_encoder   transformers CLIPVisionModel                vision_model/...
  clip             transformers CLIPModel                      text_model/, vision_model/, ...
  vit              transformers ViTModel (no pooler)           embeddings/, encoder/layer/<i>/...

`flax_to_torch_key` gives the key of the checkpoint files (`model.safetensors`,
`diffusion_pytorch_model.safetensors`) as the model hubs hold them and as diffusers and
transformers 4 name their modules' state dicts. The Flax trees are those of the Flax
classes diffusers (<= 0.39) and transformers (< 5) had:

  ModuleList item (diffusers)     down_blocks_0/resnets_1      <-> down_blocks.0.resnets.1
  numbered child (transformers)   encoder/layers/3             <-> encoder.layers.3
  Dense kernel [in, out]          .../kernel                   <-> .../weight [out, in]
  Conv kernel [kh, kw, in, out]   .../kernel                   <-> .../weight [out, in, kh, kw]
  LayerNorm / GroupNorm           .../scale                    <-> .../weight
  Embed                           .../embedding                <-> .../weight
  VAE mid-block attention         query, key, value, proj_attn <-> to_q, to_k, to_v, to_out.0
  plain params (same name)        class_embedding, cls_token, position_embeddings, logit_scale

Reading (`torch_to_flax`) also accepts the other names these models' weights come in:
transformers 5's (its CLIPTextModel / CLIPVisionModel modules, and the files its
`save_pretrained` writes for them, have no `text_model.` / `vision_model.` root; its ViT
modules say `layers.<i>.attention.q_proj`, ...), SD1.x VAE files with the attention named `query`, `key`,
`value`, `proj_attn` (optionally as 1x1 convolutions [out, in, 1, 1]), a ViT head
model's `vit.` prefix (its `pooler` and `classifier` are dropped), and CLIP's
`position_ids` buffers (ignored).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

COMPONENTS = ("unet", "vae", "text_encoder", "vision_encoder", "clip", "vit")
DIFFUSERS_COMPONENTS = ("unet", "vae")
# ModuleLists / nn.Sequentials of diffusers' UNet and VAE: Flax names item i "<list>_<i>".
DIFFUSERS_LISTS = ("down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks",
                   "to_out", "net", "downsamplers", "upsamplers")
# The VAE's mid-block attention: Flax module -> PyTorch module (diffusers' Attention).
VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Flax leaf -> PyTorch: kernels, norm scales and embedding tables are all `weight`.
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# transformers 5 drops the top-level prefix of these models' keys (loads both forms).
TRANSFORMERS_PREFIX = {"text_encoder": "text_model", "vision_encoder": "vision_model"}
# transformers 5's ViT module names -> the checkpoint names (after `layers.<i>.`).
VIT_V5_NAMES = (("attention.q_proj.", "attention.attention.query."),
                ("attention.k_proj.", "attention.attention.key."),
                ("attention.v_proj.", "attention.attention.value."),
                ("attention.o_proj.", "attention.output.dense."),
                ("mlp.fc1.", "intermediate.dense."),
                ("mlp.fc2.", "output.dense."))
# Top-level groups of a ViT head model that our ViTModel does not have.
VIT_HEADS = ("pooler", "classifier")
_LIST_ITEM = re.compile(r"(.+)_(\d+)")


def _check_component(component: str) -> None:
  if component not in COMPONENTS:
    raise ValueError(f"unknown component {component!r} (known: {', '.join(COMPONENTS)})")


# ------------------------------------------------------------------------------------
# Names

def flax_to_torch_key(component: str, flax_path: tuple[str, ...]) -> str:
  """Flax param path -> PyTorch checkpoint key, e.g. ("down_blocks_0", "attentions_0",
  "proj_in", "kernel") -> "down_blocks.0.attentions.0.proj_in.weight"."""
  _check_component(component)
  *modules, leaf = flax_path
  names = []
  for segment in modules:
    item = _LIST_ITEM.fullmatch(segment)
    if component in DIFFUSERS_COMPONENTS and item and item.group(1) in DIFFUSERS_LISTS:
      names += [item.group(1), item.group(2)]
    else:
      names.append(segment)
  if component == "vae" and len(names) >= 3 and names[-3] == "attentions" \
      and names[-1] in VAE_ATTENTION:
    names[-1] = VAE_ATTENTION[names[-1]]
  return ".".join(names + [LEAF_NAMES.get(leaf, leaf)])


def canonical_torch_key(component: str, torch_key: str) -> str | None:
  """A PyTorch key in any accepted naming -> the key `flax_to_torch_key` gives, or None
  for entries that are not weights of the model (buffers, a ViT's pooler / classifier)."""
  _check_component(component)
  if torch_key.endswith("position_ids"):  # CLIP's index buffer
    return None
  parts = torch_key.split(".")
  if component == "vae" and len(parts) >= 4 and parts[-4] == "attentions" \
      and parts[-2] in VAE_ATTENTION:  # SD1.x files: query, key, value, proj_attn
    return ".".join(parts[:-2] + [VAE_ATTENTION[parts[-2]], parts[-1]])
  if component in TRANSFORMERS_PREFIX and parts[0] != TRANSFORMERS_PREFIX[component]:
    return f"{TRANSFORMERS_PREFIX[component]}.{torch_key}"  # transformers 5 naming
  if component == "vit":
    if parts[0] == "vit" and len(parts) > 1:  # a head model's base (ViTForImageClassification)
      parts = parts[1:]
    if parts[0] in VIT_HEADS:
      return None
    if parts[0] == "layers" and len(parts) > 2:  # transformers 5 naming
      rest = ".".join(parts[2:])
      for v5_name, name in VIT_V5_NAMES:
        if rest.startswith(v5_name):
          rest = name + rest[len(v5_name):]
          break
      return f"encoder.layer.{parts[1]}.{rest}"
    return ".".join(parts)
  return torch_key


# ------------------------------------------------------------------------------------
# Arrays

def to_torch_array(flax_path: tuple[str, ...], array) -> np.ndarray:
  """Flax value -> PyTorch layout: Dense kernel [in, out] -> [out, in]; Conv kernel
  [kh, kw, in, out] -> [out, in, kh, kw]; anything else unchanged."""
  array = np.asarray(array)
  if flax_path[-1] != "kernel" or array.ndim < 2:
    return array
  if array.ndim == 2:
    return array.T
  spatial = tuple(range(array.ndim - 2))
  return array.transpose((array.ndim - 1, array.ndim - 2) + spatial)


def to_flax_array(flax_path: tuple[str, ...], array) -> np.ndarray:
  """PyTorch value -> Flax layout (the inverse of `to_torch_array`)."""
  array = np.asarray(array)
  if flax_path[-1] != "kernel" or array.ndim < 2:
    return array
  if array.ndim == 2:
    return array.T
  return array.transpose(tuple(range(2, array.ndim)) + (1, 0))


# ------------------------------------------------------------------------------------
# Whole models

def flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
  """Nested params -> {path tuple: leaf}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update({(name,) + path: leaf for path, leaf in flatten(value).items()})
    else:
      flat[(name,)] = value
  return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = leaf
  return tree


def torch_keys_of(component: str, flax_tree: Mapping) -> dict[str, tuple[str, ...]]:
  """{PyTorch key: Flax path} for every leaf of a (possibly abstract) Flax tree."""
  table = {}
  for path in flatten(flax_tree):
    key = flax_to_torch_key(component, path)
    if key in table:
      raise ValueError(f"Flax params {'/'.join(table[key])} and {'/'.join(path)} both map "
                       f"to the PyTorch key {key!r}")
    table[key] = path
  return table


def _some(items: list[str], count: int = 3) -> str:
  return f"{len(items)} (e.g. {', '.join(items[:count])})"


def torch_to_flax(component: str, torch_state: Mapping[str, np.ndarray],
                  expected: Mapping) -> dict:
  """PyTorch state dict (numpy arrays) -> nested Flax params fitting `expected` (the
  abstract Flax tree: anything with `.shape` as leaves). Arrays keep their dtype.

  Raises ValueError naming unknown keys, missing keys and wrong shapes (a few of each).
  """
  table = torch_keys_of(component, expected)
  expected_flat = flatten(expected)
  flat, unknown, wrong, given_by = {}, [], [], {}
  for torch_key, value in torch_state.items():
    key = canonical_torch_key(component, torch_key)
    if key is None:
      continue
    if key not in table:
      unknown.append(torch_key)
      continue
    if key in given_by:
      raise ValueError(f"{given_by[key]!r} and {torch_key!r} are the same weight ({key!r})")
    given_by[key] = torch_key
    path = table[key]
    want = tuple(expected_flat[path].shape)
    value = np.asarray(value)
    if component == "vae" and len(want) == 2 and value.shape[2:] == (1, 1):
      value = value.reshape(value.shape[:2])  # attention stored as a 1x1 convolution
    value = to_flax_array(path, value)
    if tuple(value.shape) != want:
      wrong.append(f"{torch_key} {tuple(np.shape(torch_state[torch_key]))} "
                   f"(Flax {'/'.join(path)} needs {want})")
      continue
    flat[path] = value
  missing = [f"{key} (Flax {'/'.join(path)})" for key, path in table.items()
             if key not in given_by]
  problems = []
  if unknown:
    problems.append(f"unknown PyTorch keys: {_some(sorted(unknown))}")
  if missing:
    problems.append(f"missing PyTorch keys: {_some(missing)}")
  if wrong:
    problems.append(f"wrong shapes: {_some(wrong)}")
  if problems:
    raise ValueError(f"PyTorch weights do not fit the {component} model: "
                     + "; ".join(problems))
  return unflatten(flat)


def flax_to_torch(component: str, flax_params: Mapping) -> dict[str, np.ndarray]:
  """Nested Flax params -> {PyTorch key: float32 C-contiguous array}, the checkpoint a
  PyTorch model loads (e.g. with `safetensors.numpy.save_file`)."""
  table = torch_keys_of(component, flax_params)
  flat = flatten(flax_params)
  # np.array copies: fresh, writable, C-ordered (np.ascontiguousarray would make 0-d 1-d).
  return {key: np.array(to_torch_array(path, np.asarray(flat[path], np.float32)), order="C")
          for key, path in table.items()}
