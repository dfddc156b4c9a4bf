"""Averaged hypernetwork targets (weights_dataset.write_mean, train/average_targets.py):
the mean of runs of the same identities, and refusals that name what differs."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hdb_jax import lidb, weights_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(folder, spec, identities, seed, base="b1"):
  train = jax.vmap(lambda k: lidb.init(spec, k))(
      jax.random.split(jax.random.key(seed), len(identities)))
  loss = np.full(len(identities), float(seed), np.float32)
  metadata = {"base_fingerprint": base, "seed": str(seed)}
  weights_dataset.write_shard(folder, weights_dataset.shard_name(0, 0, len(identities)),
                              identities, train, {"train_loss": loss}, spec, metadata)
  weights_dataset.finalize(folder, identities, metadata)
  return weights_dataset.open_dataset(folder)


def test_mean_of_two_runs(tmp_path, tiny_lidb):
  spec, _ = tiny_lidb
  first = _dataset(str(tmp_path / "s0"), spec, [4, 1, 9], seed=0)
  second = _dataset(str(tmp_path / "s1"), spec, [9, 4, 1], seed=1)
  out = str(tmp_path / "mean")
  index = weights_dataset.write_mean(out, [first.folder, second.folder])
  assert index["num_identities"] == 3 and index["metadata"]["seed"] == "0,1"
  mean = weights_dataset.open_dataset(out)
  np.testing.assert_array_equal(mean.identities, [1, 4, 9])
  np.testing.assert_allclose(mean.stats["train_loss"], 0.5)
  for component, layers in spec.layers.items():
    for layer in layers:
      for param in ("D_train", "U_train"):
        want = (first.train[component][layer][param]
                + second.train[component][layer][param]) / 2
        np.testing.assert_allclose(mean.train[component][layer][param], want, rtol=1e-6)
  with pytest.raises(FileExistsError, match="not overwriting"):
    weights_dataset.write_mean(out, [first.folder, second.folder])


def test_refuses_runs_that_differ(tmp_path, tiny_lidb):
  spec, _ = tiny_lidb
  first = _dataset(str(tmp_path / "s0"), spec, [1, 2], seed=0)
  other_ids = _dataset(str(tmp_path / "ids"), spec, [1, 3], seed=1)
  other_base = _dataset(str(tmp_path / "base"), spec, [1, 2], seed=1, base="b2")
  with pytest.raises(ValueError, match="identities differ"):
    weights_dataset.write_mean(str(tmp_path / "m1"), [first.folder, other_ids.folder])
  with pytest.raises(ValueError, match="other bases"):
    weights_dataset.write_mean(str(tmp_path / "m2"), [first.folder, other_base.folder])
  assert not os.path.exists(tmp_path / "m1" / weights_dataset.INDEX)
  # The command exits 1 naming the missing folder, and writes nothing.
  result = subprocess.run(
      [sys.executable, "-m", "train.average_targets", "--weights",
       f"{first.folder},{tmp_path / 'missing'}", "--out", str(tmp_path / "m3")],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": REPO})
  assert result.returncode == 1
  assert "missing" in result.stderr and "index.json" in result.stderr
  assert not os.path.exists(tmp_path / "m3")
