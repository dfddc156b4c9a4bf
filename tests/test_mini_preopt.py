"""The committed pre-optimization of the mini world (assets/mini_preopt, made by
train/preoptimize.py with configs/preopt_mini.py, measured by train/eval_preopt.py):
complete, made on the committed base, and the weights carry their identities."""

import json
import os

import numpy as np
import pytest

from hdb_jax import config_file, lidb, models, weights_dataset
from hdb_jax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREOPT = os.path.join(REPO, "assets", "mini_preopt")
IDENTITY_METRICS = os.path.join(REPO, "docs", "mini_preopt_identity.json")


@pytest.fixture(scope="module")
def committed():
  config = config_file.load(os.path.join(REPO, "configs", "preopt_mini.py"))
  _, frozen = models.load_or_build(config.model)
  return config, frozen, weights_dataset.open_dataset(os.path.join(PREOPT, "weights"))


def test_weights_cover_the_train_identities_of_the_committed_base(committed):
  config, frozen, dataset = committed
  assert len(dataset) >= 1000  # issue: >= 1,000 identities
  assert len(np.unique(dataset.identities)) == len(dataset)
  cfg = config.lidb
  spec = lidb.make_spec(frozen, seed=cfg.seed, a=cfg.a, b=cfg.b, rank=cfg.rank,
                        targets=dict(cfg.targets))
  assert dataset.spec == spec
  assert dataset.metadata["base_fingerprint"] == params_lib.fingerprint(frozen, spec.layers)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(PREOPT) for f in fs)
  assert size <= 50 * 2**20


def test_summary_shows_every_identity_learned(committed):
  _, _, dataset = committed
  with open(os.path.join(PREOPT, "summary.json")) as f:
    summary = json.load(f)
  assert summary["num_identities"] == len(dataset)
  before, after = dataset.stats["eval_loss_before"], dataset.stats["eval_loss_after"]
  assert after.mean() < before.mean()
  assert summary["fraction_eval_loss_improved"] == pytest.approx(np.mean(after < before))
  assert summary["fraction_eval_loss_improved"] >= 0.9


def test_preoptimized_weights_carry_identity(committed):
  """Recognizer identity accuracy of "a sks face" samples: the identity's own LiDB weights
  against the base alone (what any face scores), on the same noise."""
  _, _, dataset = committed
  with open(IDENTITY_METRICS) as f:
    metrics = json.load(f)
  assert metrics["base_fingerprint"] == dataset.metadata["base_fingerprint"]
  assert metrics["num_identities"] >= 32
  assert set(r["identity"] for r in metrics["per_identity"]) <= set(dataset.identities.tolist())
  assert metrics["identity_accuracy_preoptimized"] >= metrics["identity_accuracy_base"] + 0.1
  assert metrics["face_validity_preoptimized"] >= 0.9
