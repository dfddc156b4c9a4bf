"""hdb_jax/nn/clip.py and nn/vit.py against transformers' PyTorch CLIPTextModel,
CLIPVisionModel, CLIPModel and ViTModel (no pooler): tiny random configs, the same random
weights (every parameter drawn, norms included), outputs within 1e-5 relative error in
float32; config files round trip through transformers' classes; module paths equal
parameter paths (LiDB intercepts the attention projections by path)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hdb_jax.nn import attention, clip, torch_keys, vit

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, projection_dim=24,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
            hidden_act="quick_gelu", bos_token_id=97, eos_token_id=98, pad_token_id=98)
VISION = dict(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
              num_attention_heads=4, image_size=16, patch_size=4, hidden_act="gelu")
VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
           image_size=16, patch_size=4)
TOLERANCE = 1e-5


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _random_torch(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter drawn: weights N(0, 0.2^2), norm scales 1 + N(0, 0.1^2)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith("weight")
      param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
  return model.eval()


def _flax_params(component: str, model: torch.nn.Module, expected: dict) -> dict:
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return jax.tree_util.tree_map(jnp.asarray,
                                torch_keys.torch_to_flax(component, state, expected))


def _token_batch(eos: int, pad: int, bos: int):
  """Two prompts of different lengths, padded: ids and attention mask [2, 12]."""
  rng = np.random.default_rng(0)
  ids = np.full((2, 12), pad, np.int64)
  mask = np.zeros((2, 12), np.int64)
  for row, length in enumerate((5, 10)):
    ids[row, :length] = [bos, *rng.integers(3, 90, length - 2), eos]
    mask[row, :length] = 1
  return ids, mask


def _pixels(size: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(1).standard_normal((batch, size, size, 3)).astype(np.float32)


def _to_nchw(pixels: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())


# ------------------------------------------------------------------------------------
# Numbers

@pytest.mark.parametrize("eos_token_id", [98, 2])  # 2: the legacy rule (largest id)
def test_text_model_matches_pytorch(eos_token_id):
  config = dict(TEXT, eos_token_id=eos_token_id)
  torch_model = _random_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)))
  module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(config))
  params = _flax_params("text_encoder", torch_model, clip.param_shapes(module))
  ids, mask = _token_batch(eos=98, pad=98 if eos_token_id == 98 else 1, bos=97)
  if eos_token_id == 2:
    ids[ids == 98] = 1  # pad 1, EOS = the largest id, 98, placed by hand
    ids[0, 4], ids[1, 9] = 98, 98
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  hidden, pooled = jax.jit(module.apply)({"params": params}, ids.astype(np.int32), mask)
  assert _rel_err(hidden, ref.last_hidden_state) <= TOLERANCE
  assert _rel_err(pooled, ref.pooler_output) <= TOLERANCE
  if eos_token_id == 2:
    return
  # without a mask (as SD's text encoder runs): causal attention only
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(ids))
  hidden, _ = jax.jit(module.apply)({"params": params}, ids.astype(np.int32))
  assert _rel_err(hidden, ref.last_hidden_state) <= TOLERANCE


def test_vision_model_matches_pytorch():
  torch_model = _random_torch(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  module = clip.CLIPVisionModel(clip.CLIPVisionConfig.from_dict(VISION))
  params = _flax_params("vision_encoder", torch_model, clip.param_shapes(module))
  pixels = _pixels(16)
  with torch.no_grad():
    ref = torch_model(pixel_values=_to_nchw(pixels))
  hidden, pooled = jax.jit(module.apply)({"params": params}, pixels)
  assert hidden.shape == (2, 1 + 16, 32)
  assert _rel_err(hidden, ref.last_hidden_state) <= TOLERANCE
  assert _rel_err(pooled, ref.pooler_output) <= TOLERANCE


def test_clip_model_features_match_pytorch():
  one_layer = {"num_hidden_layers": 1}  # a faster compile; the towers have their own tests
  config = {"text_config": dict(TEXT, **one_layer), "vision_config": dict(VISION, **one_layer),
            "projection_dim": 24}
  torch_model = _random_torch(transformers.CLIPModel(transformers.CLIPConfig(**config)))
  module = clip.CLIPModel(clip.CLIPConfig.from_dict(config))
  params = _flax_params("clip", torch_model, clip.param_shapes(module))
  ids, mask = _token_batch(eos=98, pad=98, bos=97)
  pixels = _pixels(16, batch=3)
  with torch.no_grad():
    text_ref = torch_model.get_text_features(input_ids=torch.from_numpy(ids),
                                             attention_mask=torch.from_numpy(mask))
    image_ref = torch_model.get_image_features(pixel_values=_to_nchw(pixels))
    logits_ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             pixel_values=_to_nchw(pixels)).logits_per_image

  @jax.jit
  def run(params, ids, mask, pixels):
    variables = {"params": params}
    return (module.apply(variables, ids, mask, method=module.text_features),
            module.apply(variables, pixels, method=module.image_features),
            module.apply(variables, ids, pixels, mask))

  text, image, logits = run(params, ids.astype(np.int32), mask, pixels)
  assert text.shape == (2, 24) and image.shape == (3, 24) and logits.shape == (3, 2)
  assert _rel_err(text, getattr(text_ref, "pooler_output", text_ref)) <= TOLERANCE
  assert _rel_err(image, getattr(image_ref, "pooler_output", image_ref)) <= TOLERANCE
  assert _rel_err(logits, logits_ref) <= TOLERANCE


@pytest.mark.parametrize("qkv_bias,layers", [(True, 2), (False, 1)])
def test_vit_matches_pytorch(qkv_bias, layers):
  config = dict(VIT, qkv_bias=qkv_bias, num_hidden_layers=layers)
  torch_model = _random_torch(
      transformers.ViTModel(transformers.ViTConfig(**config), add_pooling_layer=False))
  module = vit.ViTModel(vit.ViTConfig.from_dict(config))
  params = _flax_params("vit", torch_model, vit.param_shapes(module))
  pixels = _pixels(16)
  with torch.no_grad():
    ref = torch_model(pixel_values=_to_nchw(pixels)).last_hidden_state
  hidden = jax.jit(module.apply)({"params": params}, pixels)
  assert hidden.shape == (2, 1 + 16, 32)
  assert _rel_err(hidden, ref) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(clip.ACTIVATIONS))
def test_activations_match_transformers(name):
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  ref = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(clip.ACTIVATIONS[name](jnp.asarray(x)), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------
# Trees and paths

def test_param_trees_have_the_old_flax_names():
  text = clip.param_shapes(clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(TEXT)))
  layer = text["text_model"]["encoder"]["layers"]["1"]
  assert set(text["text_model"]) == {"embeddings", "encoder", "final_layer_norm"}
  assert set(layer) == {"self_attn", "layer_norm1", "mlp", "layer_norm2"}
  assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
  vision = clip.param_shapes(clip.CLIPVisionModel(clip.CLIPVisionConfig.from_dict(VISION)))
  assert set(vision["vision_model"]) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
  assert set(vision["vision_model"]["embeddings"]["patch_embedding"]) == {"kernel"}
  both = clip.param_shapes(clip.CLIPModel(clip.CLIPConfig.from_dict(
      {"text_config": TEXT, "vision_config": VISION, "projection_dim": 24})))
  assert set(both) == {"text_model", "vision_model", "visual_projection", "text_projection",
                       "logit_scale"}
  assert both["logit_scale"].shape == () and both["text_projection"]["kernel"].shape == (32, 24)
  tree = vit.param_shapes(vit.ViTModel(vit.ViTConfig.from_dict(VIT)))
  assert set(tree) == {"embeddings", "encoder", "layernorm"}
  assert set(tree["embeddings"]) == {"cls_token", "patch_embeddings", "position_embeddings"}
  assert set(tree["encoder"]["layer"]["0"]) == {"attention", "intermediate", "output",
                                                "layernorm_before", "layernorm_after"}
  assert set(tree["encoder"]["layer"]["0"]["attention"]["attention"]) == {"query", "key", "value"}


def test_dense_module_paths_equal_param_paths():
  module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(TEXT))
  params = clip.param_shapes(module)
  called = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      called.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  ids = jnp.zeros((1, 4), jnp.int32)
  # Per-projection interceptors (the LiDB side path) trace inside separate_projections():
  # every Dense is called, at its param path.
  with nn.intercept_methods(record), attention.separate_projections():
    jax.eval_shape(lambda p: module.apply({"params": p}, ids), params)
  assert "text_model/encoder/layers/1/self_attn/q_proj" in called
  assert len(called) == 2 * 6
  # Otherwise q, k and v run as one matmul: only out_proj, fc1 and fc2 are Dense calls.
  separate, called[:] = list(called), []
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: module.apply({"params": p}, ids), params)
  assert len(called) == 2 * 3 and not any(p.endswith(("q_proj", "k_proj", "v_proj"))
                                         for p in called)
  for path in separate:
    node = params
    for name in path.split("/"):
      node = node[name]
    assert "kernel" in node, path


# ------------------------------------------------------------------------------------
# Configs

def test_configs_round_trip_through_transformers():
  cases = [
      (clip.CLIPTextConfig, transformers.CLIPTextConfig, transformers.CLIPTextModel, TEXT),
      (clip.CLIPVisionConfig, transformers.CLIPVisionConfig, transformers.CLIPVisionModel, VISION),
      (vit.ViTConfig, transformers.ViTConfig, None, VIT)]
  for ours_class, theirs_class, model_class, values in cases:
    ours = ours_class.from_dict(values)
    theirs = theirs_class.from_dict(ours.to_dict())
    assert ours_class.from_dict(theirs.to_dict()) == ours
    if model_class is not None:
      model_class(theirs)  # the PyTorch model builds from our config.json
    assert ours_class.from_dict(theirs_class().to_dict()) == ours_class()  # same defaults
  both = clip.CLIPConfig.from_dict({"text_config": TEXT, "vision_config": VISION,
                                    "projection_dim": 24, "logit_scale_init_value": 2.0})
  theirs = transformers.CLIPConfig.from_dict(both.to_dict())
  assert theirs.text_config.hidden_size == 32 and theirs.vision_config.patch_size == 4
  assert clip.CLIPConfig.from_dict(theirs.to_dict()) == both
  assert clip.CLIPConfig.from_dict(transformers.CLIPConfig().to_dict()) == clip.CLIPConfig()
  assert transformers.CLIPModel(theirs).logit_scale.item() == pytest.approx(2.0)


def test_config_reading_details():
  # older CLIP files: *_config_dict overrides; a full CLIP config for one tower
  full = {"text_config": {"hidden_size": 64, "num_attention_heads": 8},
          "text_config_dict": {"hidden_size": 128}, "vision_config": None}
  assert clip.CLIPConfig.from_dict(full).text_config.hidden_size == 128
  assert clip.CLIPConfig.from_dict(full).vision_config == clip.CLIPVisionConfig()
  assert clip.CLIPTextConfig.from_dict(full).hidden_size == 128
  assert clip.CLIPVisionConfig.from_dict({"vision_config": VISION}).image_size == 16
  assert vit.ViTConfig.from_dict({"image_size": [32, 32], "model_type": "vit"}).image_size == 32
  with pytest.raises(ValueError, match="hidden_act"):
    clip.CLIPTextConfig.from_dict({"hidden_act": "swish"})
  with pytest.raises(ValueError, match="num_attention_heads"):
    clip.CLIPVisionConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
  with pytest.raises(ValueError, match="image_size"):
    vit.ViTConfig.from_dict({"image_size": [32, 16]})
  with pytest.raises(ValueError, match="eos_token_id"):
    clip.CLIPTextConfig.from_dict({"eos_token_id": [2, 3]})
