"""hdb_jax/nn/ddim.py against PyTorch diffusers' DDIMScheduler (the reference)."""

import json
import os

import numpy as np
import pytest

from hdb_jax.nn import ddim

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, skip_prk_steps=True, _class_name="PNDMScheduler")
CONFIGS = {
    "sd15_epsilon": SD15,
    "sd2_v": {**SD15, "prediction_type": "v_prediction"},
    "cosine_sample_clipped": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    "mini": json.load(open(os.path.join(REPO, "assets", "mini_base", "scheduler",
                                        "scheduler_config.json"))),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_schedule_and_steps_equal_diffusers(name):
  config = ddim.DDIMConfig.from_dict(CONFIGS[name])
  reference = diffusers.DDIMScheduler.from_config(config.to_dict())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
  noise = rng.standard_normal(x.shape).astype(np.float32)
  t = np.array([0, 437, 999])
  np.testing.assert_allclose(
      ddim.add_noise(config, x, noise, t),
      reference.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)),
      rtol=0, atol=2e-6)
  np.testing.assert_allclose(
      ddim.velocity(config, x, noise, t),
      reference.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)),
      rtol=0, atol=2e-6)

  reference.set_timesteps(25)
  np.testing.assert_array_equal(ddim.timesteps(config, 25), reference.timesteps.numpy())
  ours, theirs = x, torch.from_numpy(x)
  for t in ddim.timesteps(config, 25):
    ours = ddim.step(config, 0.3 * noise + 0.1 * ours, t, ours, 25)
    output = 0.3 * torch.from_numpy(noise) + 0.1 * theirs
    theirs = reference.step(output, int(t), theirs, eta=0.0).prev_sample
  scale = np.abs(theirs.numpy()).max()
  assert np.abs(np.asarray(ours) - theirs.numpy()).max() / scale <= 1e-5


def test_unsupported_schedules_are_named():
  with pytest.raises(ValueError, match="prediction_type 'flow'"):
    ddim.DDIMConfig.from_dict({"prediction_type": "flow"})
  with pytest.raises(ValueError, match="timestep_spacing 'trailing'"):
    ddim.DDIMConfig.from_dict({"timestep_spacing": "trailing"})
