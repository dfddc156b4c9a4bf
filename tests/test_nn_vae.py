"""hdb_jax/nn/vae.py against PyTorch diffusers' AutoencoderKL (the reference): the same
random weights give the same latent mean and std and the same decoding (relative error
<= 1e-5, fp32); configs round-trip through config.json; unsupported values are refused."""

import json
import os

import jax
import numpy as np
import pytest

from hdb_jax.nn import torch_keys, vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=[16, 32, 32], norm_num_groups=8, sample_size=16,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            scaling_factor=0.5)

# PyTorch's mid-block attention projections -> diffusers' Flax names.
_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}


def _torch_to_flax(state_dict, expected) -> dict:
  """A diffusers PyTorch state dict -> our params, by the project's key map."""
  state = {k: np.array(v.detach().numpy()) for k, v in state_dict.items()}
  return torch_keys.torch_to_flax("vae", state, expected)


def _relative_error(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def models():
  """(our module, PyTorch AutoencoderKL) of TINY; norms and biases randomized too."""
  config = vae.VAEConfig.from_dict(TINY)
  torch.manual_seed(0)
  reference = diffusers.AutoencoderKL.from_config(config.to_dict()).eval()
  with torch.no_grad():
    for name, p in reference.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif p.ndim == 1:  # norm scales
        p.normal_(1.0, 0.1)
  return vae.AutoencoderKL(config), reference


def test_encode_equals_pytorch(models):
  module, reference = models
  expected = vae.param_shapes(module)
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  logvar_bias = reference.quant_conv.bias[4:]
  # as it is, then with the log-variance pushed past both clipping bounds (-30, 20)
  for shift in (0.0, 100.0, -100.0):
    with torch.no_grad():
      logvar_bias += shift
      posterior = reference.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
      want_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
      want_std = posterior.std.numpy().transpose(0, 2, 3, 1)
      params = _torch_to_flax(reference.state_dict(), expected)
      logvar_bias -= shift
    mean, std = encode(params, images)
    assert mean.shape == (2, 4, 4, 4)
    assert _relative_error(mean, want_mean) <= 1e-5
    assert _relative_error(std, want_std) <= 1e-5, shift


def test_decode_equals_pytorch(models):
  module, reference = models
  params = _torch_to_flax(reference.state_dict(), vae.param_shapes(module))
  latents = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    want = reference.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy()
  got = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, latents)
  assert got.shape == (2, 16, 16, 3)
  assert _relative_error(got, want.transpose(0, 2, 3, 1)) <= 1e-5


def test_config_round_trip_and_pytorch_reads_it():
  config = vae.VAEConfig.from_dict(TINY)
  as_json = config.to_dict()
  assert vae.VAEConfig.from_dict(as_json) == config
  _, unused = diffusers.AutoencoderKL.from_config(as_json, return_unused_kwargs=True)
  # the keys diffusers would warn about ("not expected and will be ignored")
  assert not {k for k in unused if not k.startswith("_")}


def test_reads_diffusers_flax_config():
  """The committed mini base's config.json (written by diffusers' Flax class)."""
  with open(os.path.join(REPO, "assets", "mini_base", "vae", "config.json")) as f:
    config = vae.VAEConfig.from_dict(json.load(f))
  assert config.block_out_channels == (16, 32, 64) and config.norm_num_groups == 16


@pytest.mark.parametrize("key, value", [
    ("use_quant_conv", False), ("use_post_quant_conv", False), ("shift_factor", 0.1159),
    ("mid_block_add_attention", False), ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 2)])
def test_unsupported_values_raise_naming_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    vae.VAEConfig.from_dict({**TINY, key: value})
