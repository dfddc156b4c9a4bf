"""hdb_jax/nn/torch_keys.py (PyTorch <-> Flax key map) and nn/export.py (PyTorch folders
without torch), against tiny random models of current diffusers and transformers, and the
committed mini_base Flax weights (the trees of the old upstream Flax classes).

The expected Flax trees are written down here from the old Flax classes' naming, not
from torch_keys: every `name.<i>` of diffusers becomes `name_<i>`; transformers keeps
`layers/<i>`; 1-D `weight` -> `scale`, embedding tables -> `embedding`, other `weight`
-> `kernel` (transposed); the VAE attention is `query/key/value/proj_attn`; CLIP text /
vision towers are rooted at `text_model` / `vision_model`.
"""

from __future__ import annotations

import inspect
import json
import os
import re

import flax.serialization
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                          CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel)

from hdb_jax.nn import export, torch_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "assets", "mini_base")
MINI_FILES = {"unet": "unet/diffusion_flax_model.msgpack",
              "vae": "vae/diffusion_flax_model.msgpack",
              "text_encoder": "text_encoder/flax_model.msgpack"}
VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=8)


# ------------------------------------------------------------------------------------
# Helpers

def _upstream_flax_path(component: str, key: str, ndim: int) -> tuple[str, ...]:
  """The Flax path the old upstream Flax classes give the weight of a checkpoint key."""
  if component in ("unet", "vae"):
    key = re.sub(r"(\w+?)\.(\d+)", r"\1_\2", key)
  *modules, leaf = key.split(".")
  if component == "vae" and modules[-1] in VAE_ATTENTION:
    modules[-1] = VAE_ATTENTION[modules[-1]]
  if leaf == "weight":
    leaf = "scale" if ndim == 1 else "embedding" if modules[-1].endswith("embedding") \
        and ndim == 2 else "kernel"
  return tuple(modules) + (leaf,)


def _upstream_flax_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  return value


def _expected_tree(component: str, checkpoint: dict) -> tuple[dict, dict]:
  """({checkpoint key: Flax path}, Flax tree) of a checkpoint, by the upstream naming."""
  paths = {key: _upstream_flax_path(component, key, value.ndim)
           for key, value in checkpoint.items()}
  tree = torch_keys.unflatten({path: _upstream_flax_value(path, checkpoint[key])
                               for key, path in paths.items()})
  return paths, tree


def _numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_same_tree(got, want):
  got, want = torch_keys.flatten(got), torch_keys.flatten(want)
  assert sorted(got) == sorted(want)
  for path in want:
    assert got[path].dtype == want[path].dtype, path
    np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))


def _mini_tree(component: str) -> dict:
  with open(os.path.join(MINI, MINI_FILES[component]), "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def _mini_config(component: str) -> dict:
  with open(os.path.join(MINI, component, "config.json")) as f:
    return json.load(f)


def _accepted(model_class, config: dict) -> dict:
  """The config keys the PyTorch class's __init__ takes."""
  params = inspect.signature(model_class.__init__).parameters
  return {k: v for k, v in config.items() if k in params}


def _tiny_unet(tiny_config, **changes):
  torch.manual_seed(0)
  return UNet2DConditionModel(**{**dict(tiny_config.model.unet), **changes})


def _tiny_vae(tiny_config):
  torch.manual_seed(0)
  return AutoencoderKL(**_accepted(AutoencoderKL, dict(tiny_config.model.vae)))


# ------------------------------------------------------------------------------------
# Key map = a bijection, on current diffusers models

@pytest.mark.parametrize("name", ["unet", "unet_sd2", "vae"])
def test_diffusers_keys_map_one_to_one_and_back(tiny_config, name):
  if name == "vae":
    component, model = "vae", _tiny_vae(tiny_config)
  elif name == "unet_sd2":  # SD2: linear proj_in / proj_out, per-block head dims
    component, model = "unet", _tiny_unet(tiny_config, use_linear_projection=True,
                                          attention_head_dim=(2, 4), cross_attention_dim=48)
  else:
    component, model = "unet", _tiny_unet(tiny_config)
  state = _numpy_state(model)
  paths, expected = _expected_tree(component, state)
  assert len(set(paths.values())) == len(paths)                    # one Flax path each
  for key, path in paths.items():
    assert torch_keys.flax_to_torch_key(component, path) == key   # and back
  tree = torch_keys.torch_to_flax(component, state, expected)
  _assert_same_tree(tree, expected)
  back = torch_keys.flax_to_torch(component, tree)
  assert sorted(back) == sorted(state)
  for key, value in back.items():
    assert value.dtype == np.float32 and value.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


# ------------------------------------------------------------------------------------
# ... and on current transformers models (their module names and their files)

def _transformers_model(component: str):
  torch.manual_seed(0)
  if component == "text_encoder":
    return CLIPTextModel(CLIPTextConfig(**TEXT))
  if component == "vision_encoder":
    return CLIPVisionModel(CLIPVisionConfig(**VISION))
  if component == "clip":
    return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=8))
  return ViTModel(ViTConfig(**VISION), add_pooling_layer=False)


# Checkpoint keys of the old Flax classes' tree roots (transformers 4 and the model hubs).
ROOTS = {"text_encoder": "text_model.", "vision_encoder": "vision_model.", "clip": "", "vit": ""}
# Some params of each, as the old Flax classes named them.
KNOWN_PATHS = {
    "text_encoder": [("text_model", "embeddings", "token_embedding", "embedding"),
                     ("text_model", "encoder", "layers", "1", "self_attn", "q_proj", "kernel"),
                     ("text_model", "final_layer_norm", "scale")],
    "vision_encoder": [("vision_model", "embeddings", "class_embedding"),
                       ("vision_model", "embeddings", "patch_embedding", "kernel"),
                       ("vision_model", "pre_layrnorm", "scale")],
    "clip": [("logit_scale",), ("text_projection", "kernel"), ("visual_projection", "kernel"),
             ("vision_model", "post_layernorm", "bias")],
    "vit": [("embeddings", "cls_token"), ("embeddings", "position_embeddings"),
            ("embeddings", "patch_embeddings", "projection", "kernel"),
            ("encoder", "layer", "1", "attention", "attention", "query", "kernel"),
            ("encoder", "layer", "0", "attention", "output", "dense", "kernel"),
            ("encoder", "layer", "0", "intermediate", "dense", "bias"),
            ("encoder", "layer", "0", "output", "dense", "kernel"),
            ("encoder", "layer", "0", "layernorm_before", "scale"), ("layernorm", "scale")],
}


@pytest.mark.parametrize("component", ["text_encoder", "vision_encoder", "clip", "vit"])
def test_transformers_keys_map_one_to_one_and_back(tmp_path, component):
  model = _transformers_model(component)
  model.save_pretrained(tmp_path / "saved")  # transformers 5's own file naming
  saved = safetensors.numpy.load_file(str(tmp_path / "saved" / "model.safetensors"))
  checkpoint = {(k if k.startswith(ROOTS[component]) else ROOTS[component] + k): v
                for k, v in saved.items()}
  paths, expected = _expected_tree(component, checkpoint)
  assert len(set(paths.values())) == len(paths)
  assert set(KNOWN_PATHS[component]) <= set(paths.values())
  for key, path in paths.items():
    assert torch_keys.flax_to_torch_key(component, path) == key
  # The module's own state dict (transformers 5 names, buffers), its file, the hub naming.
  for state in (_numpy_state(model), saved, checkpoint):
    _assert_same_tree(torch_keys.torch_to_flax(component, state, expected), expected)
  back = torch_keys.flax_to_torch(component, expected)
  assert sorted(back) == sorted(checkpoint)
  for key, value in back.items():
    assert value.shape == checkpoint[key].shape, key
    np.testing.assert_array_equal(value, checkpoint[key], err_msg=key)
  # What we write loads completely into the PyTorch class.
  export.write_torch_component(str(tmp_path / "ours"), component, expected,
                               model.config.to_dict())
  options = {"add_pooling_layer": False} if component == "vit" else {}
  loaded, info = type(model).from_pretrained(str(tmp_path / "ours"), output_loading_info=True,
                                             **options)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  for key, value in _numpy_state(loaded).items():
    np.testing.assert_array_equal(value, _numpy_state(model)[key], err_msg=key)


def test_vit_head_model_weights_are_unwrapped(tmp_path):
  """A ViTForImageClassification's `vit.` prefix goes; its pooler and classifier too."""
  _transformers_model("vit").save_pretrained(tmp_path)
  saved = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  _, expected = _expected_tree("vit", saved)
  head = {"vit." + k: v for k, v in saved.items()}
  head.update({"vit.pooler.dense.weight": np.ones((32, 32), np.float32),
               "vit.pooler.dense.bias": np.ones(32, np.float32),
               "classifier.weight": np.ones((10, 32), np.float32),
               "classifier.bias": np.ones(10, np.float32)})
  _assert_same_tree(torch_keys.torch_to_flax("vit", head, expected), expected)
  clip_expected = {"logit_scale": np.zeros(())}
  with pytest.raises(ValueError, match="classifier.weight"):  # only a ViT drops them
    torch_keys.torch_to_flax("clip", {"logit_scale": np.zeros(()),
                                      "classifier.weight": np.zeros(1)}, clip_expected)


# ------------------------------------------------------------------------------------
# The committed mini_base weights (trees of the old upstream Flax classes)

@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_mini_base_loads_into_pytorch_and_comes_back_bit_for_bit(component):
  tree, config = _mini_tree(component), _mini_config(component)
  if component == "text_encoder":
    model = CLIPTextModel(CLIPTextConfig(**config))
  else:
    model_class = UNet2DConditionModel if component == "unet" else AutoencoderKL
    model = model_class(**_accepted(model_class, config))
  state = torch_keys.flax_to_torch(component, tree)
  module_state = state
  if component == "text_encoder":  # transformers 5 modules drop the `text_model.` root
    module_state = {k.removeprefix("text_model."): v for k, v in state.items()}
  model.load_state_dict({k: torch.from_numpy(v) for k, v in module_state.items()}, strict=True)
  _assert_same_tree(torch_keys.torch_to_flax(component, _numpy_state(model), tree), tree)
  _assert_same_tree(torch_keys.torch_to_flax(component, state, tree), tree)


def test_lora_module_names_are_the_base_weight_names():
  """hdb_jax/convert.py names LoRA modules by `torch_module`: `<module>.weight` must be
  the base model's PyTorch key of every UNet and text-encoder kernel."""
  from hdb_jax import convert
  for component in ("unet", "text_encoder"):
    kernels = [path for path in torch_keys.flatten(_mini_tree(component))
               if path[-1] == "kernel"]
    assert len(kernels) >= 12
    for path in kernels:
      layer = "/".join(path[:-1])
      assert torch_keys.flax_to_torch_key(component, path) == \
          convert.torch_module(component, layer) + ".weight"


# ------------------------------------------------------------------------------------
# Other names weights come in; errors

def _sd1_vae_names(state: dict) -> dict:
  """The attention names of SD1.x VAE files (diffusers < 0.15): query, key, value, proj_attn."""
  renamed = {}
  for key, value in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      key = re.sub(rf"(attentions\.\d+)\.{re.escape(new)}\.", rf"\1.{old}.", key)
    renamed[key] = value
  return renamed


def test_sd1_vae_attention_names_and_1x1_convolutions_load(tiny_config, tmp_path):
  model = _tiny_vae(tiny_config)
  state = _numpy_state(model)
  _, expected = _expected_tree("vae", state)
  legacy = _sd1_vae_names(state)
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  assert sum(".query." in key for key in legacy) == 4  # weight, bias x encoder, decoder
  _assert_same_tree(torch_keys.torch_to_flax("vae", legacy, expected), expected)
  as_conv = {k: v[:, :, None, None] if v.ndim == 2 else v for k, v in legacy.items()}
  _assert_same_tree(torch_keys.torch_to_flax("vae", as_conv, expected), expected)
  # These are the names diffusers itself still reads.
  config = {"_class_name": "AutoencoderKL", **_accepted(AutoencoderKL, dict(tiny_config.model.vae))}
  (tmp_path / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  loaded = AutoencoderKL.from_pretrained(str(tmp_path))
  for key, value in _numpy_state(loaded).items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_unknown_missing_and_wrong_shape_keys_are_named():
  tree = _mini_tree("text_encoder")
  state = torch_keys.flax_to_torch("text_encoder", tree)
  q_proj = "text_model.encoder.layers.0.self_attn.q_proj.weight"
  fc1 = "text_model.encoder.layers.1.mlp.fc1.weight"
  broken = dict(state)
  del broken["text_model.final_layer_norm.bias"]
  broken["text_model.encoder.layers.0.self_attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  broken[q_proj] = broken[q_proj][:, :-1]
  broken[fc1] = broken[fc1].T
  with pytest.raises(ValueError) as error:
    torch_keys.torch_to_flax("text_encoder", broken, tree)
  message = str(error.value)
  for name in ("text_model.final_layer_norm.bias", "self_attn.qkv.weight", q_proj, fc1):
    assert name in message, message
  assert "unknown" in message and "missing" in message and "wrong shape" in message
  doubled = {**_sd1_vae_names(torch_keys.flax_to_torch("vae", _mini_tree("vae"))),
             "decoder.mid_block.attentions.0.to_q.weight": np.zeros((64, 64), np.float32)}
  with pytest.raises(ValueError, match="same weight"):
    torch_keys.torch_to_flax("vae", doubled, _mini_tree("vae"))
  with pytest.raises(ValueError, match="unknown component"):
    torch_keys.flax_to_torch_key("controlnet", ("conv_in", "kernel"))


def test_nothing_is_cast():
  tree = _mini_tree("text_encoder")
  half = {k: v.astype(np.float16) for k, v in
          torch_keys.flax_to_torch("text_encoder", tree).items()}
  loaded = torch_keys.flatten(torch_keys.torch_to_flax("text_encoder", half, tree))
  assert {v.dtype for v in loaded.values()} == {np.dtype(np.float16)}


# ------------------------------------------------------------------------------------
# Base export without torch

def _torch_config(component: str) -> dict:
  """The mini_base config.json as PyTorch diffusers / transformers read it (by hand here;
  our configs' `to_dict()` writes it in the library)."""
  config = _mini_config(component)
  if component == "text_encoder":
    return {**config, "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
  model_class = UNet2DConditionModel if component == "unet" else AutoencoderKL
  return {"_class_name": model_class.__name__, **_accepted(model_class, config)}


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_written_component_loads_with_from_pretrained(tmp_path, component):
  tree = _mini_tree(component)
  folder = str(tmp_path / component)
  weights = export.write_torch_component(folder, component, tree, _torch_config(component))
  assert os.path.basename(weights) == export.WEIGHTS_FILES[component]
  with safetensors.safe_open(weights, "np") as f:
    assert f.metadata() == {"format": "pt"}
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f) == json.loads(json.dumps(_torch_config(component)))
  if component == "text_encoder":
    model, info = CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
  else:
    model_class = UNet2DConditionModel if component == "unet" else AutoencoderKL
    model = model_class.from_pretrained(folder)
  # Every weight loaded (a missing one would be random), and converts back bit for bit.
  _assert_same_tree(torch_keys.torch_to_flax(component, _numpy_state(model), tree), tree)
