"""The committed mini-world base: it loads, and a small, seeded version of the quality
measurement passes (the full one, 256 samples per group, is docs/mini_base_metrics.json,
made by train/eval_base.py)."""

import json
import os

import pytest

from hdb_jax import config_file, models
from hdb_jax.mini import base_eval

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


@pytest.mark.slow  # ~50 s: 240 samples; the committed full measurement is checked fast below
def test_small_seeded_quality_check(mini_base):
  """40 samples per group, seed 1: the targets, and the identifier "sks" before "face"
  keeps the prompt's context (10 points of slack at this sample size)."""
  config, sd, params = mini_base
  per_group = 40
  groups = {name: prompts for name, prompts in base_eval.all_groups().items()
            if name in ("face", "background", "style", "face_id", "background_id", "style_id")}
  result, samples = base_eval.evaluate(sd, params, per_group=per_group, seed=1,
                                       num_steps=config.pretrain.sample_steps,
                                       guidance_scale=config.pretrain.guidance_scale,
                                       groups=groups)
  summary, metrics = result["summary"], result["groups"]
  print(summary)
  assert samples["face"].shape == (per_group, 32, 32, 3)
  assert summary["face_validity"] >= base_eval.TARGETS["face_validity"]
  assert summary["face_validity_min_group"] >= 0.85
  assert summary["background_accuracy"] >= base_eval.TARGETS["background_accuracy"]
  assert summary["style_accuracy"] >= base_eval.TARGETS["style_accuracy"]
  # 50 distinct tuples per 256 samples, scaled to this sample count.
  assert summary["diversity"] >= base_eval.TARGETS["diversity_per_256"] * per_group / 256
  assert metrics["background_id"]["background_accuracy"] >= \
      metrics["background"]["background_accuracy"] - 0.1
  assert metrics["style_id"]["style_accuracy"] >= metrics["style"]["style_accuracy"] - 0.1


def test_full_measurement_is_committed_and_passes():
  with open(METRICS) as f:
    text = f.read()
  from test_repo_files import MACHINE_PATH
  assert "NaN" not in text and not MACHINE_PATH.search(text)  # strict, no machine paths
  metrics = json.loads(text)
  summary = metrics["summary"]
  assert summary["samples_per_group"] >= 256
  assert summary["passes"]
  assert summary["face_validity"] >= 0.90
  assert summary["background_accuracy"] >= 0.90 and summary["style_accuracy"] >= 0.90
  assert summary["diversity"] >= 50
  for name in base_eval.BASE_GROUPS:  # every group with and without the identifier
    assert name + "_control" in metrics["groups"]  # reported, not held to targets
    for suffix in ("", "_id"):
      assert metrics["groups"][name + suffix]["face_validity"] >= \
          base_eval.TARGETS["face_validity_every_group"]
  assert summary["identifier_context_gap_max"] <= base_eval.TARGETS["identifier_context_gap"]
