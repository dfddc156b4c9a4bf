"""hdb_jax/nn/unet.py against PyTorch diffusers' UNet2DConditionModel (the reference):
the same random weights give the same outputs (relative error <= 1e-5, fp32); configs
round-trip through config.json; unsupported values are refused by name."""

import os

import jax
import numpy as np
import pytest

from hdb_jax.nn import attention, torch_keys, unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/tiny.py's shape: one cross-attention block down and up, heads = 4.
TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=[32, 64], attention_head_dim=4, cross_attention_dim=32,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
# SD2's options: linear projections, heads per block; also 2 transformer layers per
# block, 8 norm groups, a norm eps and upcast attention (float32 here anyway), no mid
# block, the other timestep embedding layout.
SD2_STYLE = dict(sample_size=4, in_channels=4, out_channels=3, layers_per_block=1,
                 block_out_channels=[16, 32], attention_head_dim=[2, 8],
                 cross_attention_dim=24, use_linear_projection=True,
                 transformer_layers_per_block=2, norm_num_groups=8, norm_eps=1e-6,
                 upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
                 mid_block_type=None,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
CONFIGS = {"tiny": TINY, "sd2_style": SD2_STYLE}


def _torch_to_flax(state_dict, expected) -> dict:
  """A diffusers PyTorch state dict -> our params, by the project's key map."""
  state = {k: np.array(v.detach().numpy()) for k, v in state_dict.items()}
  return torch_keys.torch_to_flax("unet", state, expected)


def _random_reference(config: unet.UNetConfig, seed: int = 0):
  """PyTorch UNet from our to_dict(), seeded; norms and biases randomized too."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel.from_config(config.to_dict()).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:  # norm scales
        p.normal_(1.0, 0.1)
  return model


def _compare(config: unet.UNetConfig, timesteps, batch: int, context_len: int,
             seed: int = 0) -> float:
  """Relative error of our output vs PyTorch's; `timesteps` [batch] or a scalar."""
  reference = _random_reference(config, seed)
  module = unet.UNet2DConditionModel(config)
  params = _torch_to_flax(reference.state_dict(), unet.param_shapes(module))
  rng = np.random.default_rng(seed)
  size = config.sample_size
  timesteps = np.asarray(timesteps, np.int32)
  sample = rng.standard_normal((batch, config.in_channels, size, size)).astype(np.float32)
  context = rng.standard_normal((batch, context_len, config.cross_attention_dim)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(sample), torch.from_numpy(timesteps),
                     torch.from_numpy(context)).sample.numpy()
  got = jax.jit(module.apply)({"params": params}, sample, timesteps, context)
  assert got.shape == want.shape
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def test_dot_product_attention_is_plain_softmax_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
  mask = rng.uniform(size=(2, 1, 5, 7)) < 0.7
  mask[..., 0] = True  # every query keeps a key
  logits = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(8)
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = np.einsum("bhls,bshd->blhd", weights, v)
  got = attention.dot_product_attention(q, k, v, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  merged = attention.merge_heads(got)
  assert merged.shape == (2, 5, 24)
  np.testing.assert_array_equal(attention.split_heads(merged, 3), got)


def test_tiny_outputs_equal_pytorch():
  assert _compare(unet.UNetConfig.from_dict(TINY), [1, 999], batch=2, context_len=7) <= 1e-5


def test_sd2_style_outputs_equal_pytorch_with_a_scalar_timestep():
  assert _compare(unet.UNetConfig.from_dict(SD2_STYLE), 500, batch=2, context_len=5) <= 1e-5


@pytest.mark.slow
def test_sd15_shaped_outputs_equal_pytorch():
  """SD1.5's architecture (configs/sd15.py), random weights, 16x16 latents (~90 s)."""
  from hdb_jax import config_file
  architecture = dict(config_file.load(os.path.join(REPO, "configs", "sd15.py")).model.unet)
  config = unet.UNetConfig.from_dict({**architecture, "sample_size": 16})
  assert _compare(config, [321], batch=1, context_len=77) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip_and_pytorch_reads_it(name):
  config = unet.UNetConfig.from_dict(CONFIGS[name])
  as_json = config.to_dict()
  assert unet.UNetConfig.from_dict(as_json) == config
  _, unused = diffusers.UNet2DConditionModel.from_config(as_json, return_unused_kwargs=True)
  # the keys diffusers would warn about ("not expected and will be ignored")
  assert not {k for k in unused if not k.startswith("_")}


def test_reads_diffusers_flax_config():
  """The committed mini base's config.json (written by diffusers' Flax class)."""
  import json
  with open(os.path.join(REPO, "assets", "mini_base", "unet", "config.json")) as f:
    config = unet.UNetConfig.from_dict(json.load(f))
  assert config.num_heads == (4, 4) and config.cross_attention_dim == 64


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"),
    ("dual_cross_attention", True), ("only_cross_attention", True),
    ("num_attention_heads", 8), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("attention_head_dim", [4, 4, 4]), ("attention_head_dim", 3),
    ("resnet_time_scale_shift", "scale_shift")])
def test_unsupported_values_raise_naming_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    unet.UNetConfig.from_dict({**TINY, key: value})
