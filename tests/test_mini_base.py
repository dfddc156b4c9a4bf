"""The committed mini-world base: it loads, and a small, seeded version of the quality
measurement passes (the full one, 256 samples per group, is docs/mini_base_metrics.json,
made by train/eval_base.py)."""

import json
import os

import pytest

from hdb_jax import base_eval, config_file, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = os.path.join(REPO, "docs", "mini_base_metrics.json")


@pytest.fixture(scope="module")
def mini_base():
  config = config_file.load(os.path.join(REPO, "configs", "mini.py"))
  sd, params = models.load(config.model.path)
  return config, sd, params


def test_committed_base_is_small_and_complete(mini_base):
  config, sd, params = mini_base
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(config.model.path)
             for f in fs)
  assert size <= 20 * 2**20
  assert sd.image_size == 32 and sd.latent_size == 8
  assert abs(sd.vae.config.scaling_factor - 1.0) > 1e-3  # set from the trained VAE's latents


def test_small_seeded_quality_check(mini_base):
  config, sd, params = mini_base
  per_group = 40
  result, samples = base_eval.evaluate(sd, params, per_group=per_group, seed=1,
                                       num_steps=config.pretrain.sample_steps,
                                       guidance_scale=config.pretrain.guidance_scale)
  summary = result["summary"]
  print(summary)
  assert samples["face"].shape == (per_group, 32, 32, 3)
  assert summary["face_validity"] >= base_eval.TARGETS["face_validity"]
  assert summary["background_accuracy"] >= base_eval.TARGETS["background_accuracy"]
  assert summary["style_accuracy"] >= base_eval.TARGETS["style_accuracy"]
  # 50 distinct tuples per 256 samples, scaled to this sample count.
  assert summary["diversity"] >= base_eval.TARGETS["diversity_per_256"] * per_group / 256


def test_full_measurement_is_committed_and_passes():
  with open(METRICS) as f:
    metrics = json.load(f)
  summary = metrics["summary"]
  assert summary["samples_per_group"] >= 256
  assert summary["passes"]
  assert summary["face_validity"] >= 0.90
  assert summary["background_accuracy"] >= 0.90 and summary["style_accuracy"] >= 0.90
  assert summary["diversity"] >= 50
