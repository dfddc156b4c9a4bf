"""Hypernetwork training (hdb_jax/hypernet_train.py, train/train_hypernet.py) on a model
smaller than configs/tiny.py and synthetic_faces/tiny, with stand-in targets: steps lower
the loss, the entry point writes TensorBoard scalars and a loadable hypernetwork, a run
stopped by SIGTERM, then killed with SIGKILL, and resumed equals an uninterrupted one, and 8 devices equal 1.

Tolerances as in test_preopt.py: the same compiled program 1e-6, another program (8
devices) 1e-3 (AdamW's first steps move a value by up to lr = 1e-3).
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from hdb_jax import (config_file, hypernet, hypernet_train, lidb, models, tensorboard,
                     weights_dataset)
from hdb_jax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDENTITIES = 8
RUN = {  # config overrides shared by every run (dotted keys)
    "model.unet.block_out_channels": (32,),
    "model.unet.down_block_types": ("CrossAttnDownBlock2D",),
    "model.unet.up_block_types": ("CrossAttnUpBlock2D",),
    "model.text_encoder.num_hidden_layers": 1,
    "data.config": "tiny",
    "hypernet.width": 32, "hypernet.depth": 1, "hypernet.heads": 2, "hypernet.iterations": 2,
    "hypernet.encoder.patch": 8, "hypernet.encoder.width": 32,
    "hypernet.encoder.depth": 1, "hypernet.encoder.heads": 2,
    "train.steps": 30, "train.batch_size": 8, "train.learning_rate": 1e-3, "train.warmup": 1,
    "train.log_every": 1, "train.checkpoint_every": 5, "train.eval_every": 0,
}
SAME_PROGRAM_ATOL = 1e-6
OTHER_PROGRAM_ATOL = 1e-3


def _config(overrides):
  """configs/hypernet_mini.py on the architecture of its model, random init."""
  return config_file.load(os.path.join(REPO, "configs", "hypernet_mini.py"),
                          {"model.path": "", **overrides})


def _flags(overrides):
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in overrides.items()]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
  """synthetic_faces/tiny and a weights dataset of its first train identities with
  random LiDB weights on the small model (the trainer only needs their shapes and base)."""
  from hdb_jax import data
  from hdb_jax.mini import dataset
  root = tmp_path_factory.mktemp("hypernet_data")
  data_dir, weights_dir = str(root / "tfds"), str(root / "weights")
  dataset.build("tiny", data_dir)
  identities = np.array([i for i, _, _ in data.identity_ranges(
      dataset.source("tiny", "train", data_dir))][:NUM_IDENTITIES], np.int64)
  config = _config(RUN)
  _, frozen = models.load_or_build(config.model)
  spec = lidb.make_spec(frozen, seed=0, a=100, b=50, rank=1)
  keys = jax.random.split(jax.random.key(0), NUM_IDENTITIES)
  train = jax.vmap(lambda k: jax.tree_util.tree_map(
      lambda x: x + 0.1 * jax.random.normal(k, x.shape), lidb.init(spec, k)))(keys)
  meta = {"base_fingerprint": params_lib.fingerprint(frozen, spec.layers)}
  weights_dataset.write_shard(weights_dir, weights_dataset.shard_name(0, 0, NUM_IDENTITIES),
                              identities, jax.device_get(train),
                              {"train_loss": np.zeros(NUM_IDENTITIES, np.float32)}, spec, meta)
  weights_dataset.finalize(weights_dir, identities, meta)
  return {"data.data_dir": data_dir, "data.weights": weights_dir}


def _final_params(workdir):
  return safetensors.numpy.load_file(os.path.join(workdir, "hypernet", hypernet.WEIGHTS_FILE))


def _assert_same_params(dir_a, dir_b, atol):
  a, b = _final_params(dir_a), _final_params(dir_b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=atol, err_msg=key)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, stand_in):
  """1 device, in this process, with a held-out evaluation at the end."""
  import train.train_hypernet as entry
  workdir = str(tmp_path_factory.mktemp("hypernet_ref"))
  config = _config({**RUN, **stand_in, "train.eval_every": 30, "train.eval_identities": 2,
                    "train.eval_samples": 1, "train.sample_steps": 2})
  assert entry.run(config, workdir)
  return workdir


def _launch(workdir, overrides, devices=1, args=()):
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  command = [sys.executable, "-m", "train.train_hypernet",
             "--config", os.path.join(REPO, "configs", "hypernet_mini.py"),
             "--workdir", str(workdir), "--config.model.path="] + _flags(overrides) + list(args)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_weight_losses():
  w = lambda d, u: {"c": {"l": {"D_train": jnp.array(d, jnp.float32)[None],
                                "U_train": jnp.array(u, jnp.float32)[None]}}}
  a = w([[1.0], [2.0]], [[3.0, 4.0]])
  b = w([[2.0], [4.0]], [[1.5, 2.0]])  # the same residual D @ U, split otherwise
  assert float(hypernet_train.weight_loss_fn("params")(a, b)[0]) > 0.5
  assert float(hypernet_train.weight_loss_fn("residual")(a, b)[0]) < 1e-9
  with pytest.raises(ValueError, match="weight loss"):
    hypernet_train.weight_loss_fn("other")


def test_run_writes_tensorboard_and_a_loadable_hypernetwork(reference_run, stand_in):
  scalars = tensorboard.read_scalars(os.path.join(reference_run, "tensorboard"))
  for tag in ("loss", "diffusion_loss", "weight_loss", "grad_norm", "learning_rate",
              "heldout_identity_accuracy", "heldout_identity_accuracy_base"):
    assert tag in scalars, sorted(scalars)
  assert [step for step, _ in scalars["loss"]] == list(range(1, 31))
  assert 0.0 <= scalars["heldout_identity_accuracy"][-1][1] <= 1.0
  net, params, info = hypernet.load(os.path.join(reference_run, "hypernet"))
  spec = weights_dataset.open_dataset(stand_in["data.weights"]).spec
  assert info["lidb_spec"] == spec and info["prompt"] == "a sks face"
  predicted = net.apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32),
                        iterations=3)
  reference = lidb.init(spec, jax.random.key(0))
  assert jax.tree_util.tree_structure(predicted) == jax.tree_util.tree_structure(reference)
  # What made it: provenance.json beside the weights, tied to them by their fingerprint.
  with open(os.path.join(reference_run, "hypernet", "provenance.json")) as f:
    record = json.load(f)
  assert record["fingerprint"] == info["fingerprint"]
  assert record["steps"] == RUN["train.steps"] == record["config"]["train"]["steps"]
  assert record["data"]["num_identities"] == NUM_IDENTITIES
  assert record["data"]["source"] == "synthetic_faces/tiny:train"
  assert len(record["data"]["fingerprint"]) == len(record["data"]["weights_fingerprint"]) == 16
  assert record["base_fingerprint"] == info["base_fingerprint"]


def _steps_saved(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path, stand_in,
                                                               reference_run):
  """A real SIGTERM between checkpoints: the run checkpoints the step in hand and exits 0
  saying so. The same command again, killed with SIGKILL after its next checkpoint: nothing
  more is saved. The same command then finishes with the uninterrupted run's weights."""
  import signal
  import train.train_hypernet as entry
  process = _launch(tmp_path, {**RUN, **stand_in})
  while process.poll() is None and not _steps_saved(tmp_path):
    time.sleep(0.02)
  time.sleep(0.3)  # a few steps on, between checkpoints (every 5)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate()
  assert process.returncode == 0, out[-3000:]
  assert "rerun the same command to continue" in out, out[-3000:]
  stopped_at = _steps_saved(tmp_path)[-1]
  assert stopped_at < RUN["train.steps"], "finished before the SIGTERM"
  assert not os.path.exists(os.path.join(tmp_path, "hypernet"))

  process = _launch(tmp_path, {**RUN, **stand_in})
  while process.poll() is None and _steps_saved(tmp_path)[-1] == stopped_at:
    time.sleep(0.02)
  process.kill()  # SIGKILL: no chance to save anything more
  out, _ = process.communicate()
  assert _steps_saved(tmp_path)[-1] > stopped_at, out[-3000:]
  assert not os.path.exists(os.path.join(tmp_path, "hypernet")), "finished before the kill"
  assert entry.run(_config({**RUN, **stand_in}), str(tmp_path))
  _assert_same_params(reference_run, tmp_path, SAME_PROGRAM_ATOL)


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_eight_devices_equal_one(tmp_path, stand_in, reference_run):
  process = _launch(tmp_path, {**RUN, **stand_in}, devices=8)
  out, _ = process.communicate(timeout=900)
  assert process.returncode == 0, out[-3000:]
  _assert_same_params(reference_run, tmp_path, OTHER_PROGRAM_ATOL)


def test_predict_writes_a_lidb_file(reference_run, stand_in, tmp_path):
  from hdb_jax import cli
  image = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")
  out = str(tmp_path / "me.safetensors")
  hypernet_dir = os.path.join(reference_run, "hypernet")
  assert cli.main(["predict", "--hypernet", hypernet_dir, "--image", image, "--out", out]) == 0
  train, spec, metadata = lidb.load(out)
  assert spec == weights_dataset.open_dataset(stand_in["data.weights"]).spec
  assert metadata["source"] == "hypernet" and metadata["iterations"] == "2"
  assert metadata["token"] == "sks" and len(metadata["hypernet_fingerprint"]) == 16
  assert max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(train)) > 0
  zero = str(tmp_path / "zero.safetensors")
  assert cli.main(["predict", "--hypernet", hypernet_dir, "--image", image, "--out", zero,
                   "--iterations", "0"]) == 0
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(lidb.load(zero)[0]))
  # --scale: every residual times the factor (U_train scaled), recorded in the metadata
  scaled = str(tmp_path / "scaled.safetensors")
  assert cli.main(["predict", "--hypernet", hypernet_dir, "--image", image, "--out", scaled,
                   "--scale", "1.5"]) == 0
  scaled_train, _, scaled_metadata = lidb.load(scaled)
  assert scaled_metadata["scale"] == "1.5" and metadata["scale"] == "1.0"
  for component, layers in train.items():
    for layer, weights in layers.items():
      np.testing.assert_array_equal(scaled_train[component][layer]["D_train"],
                                    weights["D_train"])
      np.testing.assert_allclose(scaled_train[component][layer]["U_train"],
                                 1.5 * weights["U_train"], rtol=1e-6)
  assert cli.main(["predict", "--hypernet", hypernet_dir, "--image", image,
                   "--out", str(tmp_path / "none.safetensors"), "--scale", "0"]) == 1
  assert not os.path.exists(tmp_path / "none.safetensors")
  not_image = tmp_path / "not_an_image.png"
  not_image.write_text("hello")
  assert cli.main(["predict", "--hypernet", hypernet_dir, "--image", str(not_image),
                   "--out", str(tmp_path / "bad.safetensors")]) == 1
  assert not os.path.exists(tmp_path / "bad.safetensors")


def test_eval_hypernet_scores_every_row(reference_run, stand_in):
  import train.eval_hypernet as evaluate
  config = _config({**RUN, **stand_in})
  metrics, grid = evaluate.run(config, os.path.join(reference_run, "hypernet"), "train",
                               num_identities=3, iterations=[2], per_prompt=1, chunk=2,
                               num_steps=2, guidance_scale=4.0, seed=0)
  assert list(metrics["rows"]) == ["base", "hypernet_s2", "preoptimized"]
  assert len(metrics["prompts"]) == 12 and metrics["num_identities"] == 3
  for name, row in metrics["rows"].items():
    assert 0.0 <= row["identity_accuracy_plain"] <= 1.0, (name, row)
    assert 0.0 <= row["background_accuracy"] <= 1.0 and 0.0 <= row["face_validity"] <= 1.0
    if name != "base":
      assert abs(row["identity_gain_plain"] - (row["identity_accuracy_plain"] - metrics[
          "rows"]["base"]["identity_accuracy_plain"])) < 1e-9
  assert len(metrics["per_identity_plain"]) == 3
  assert grid.shape[0] == 3 * (1 + 3 * 3)  # photo + 3 rows x 3 prompts per identity


def test_a_loss_that_is_not_finite_stops_before_checkpointing(tmp_path, stand_in):
  """Targets so large that the weight loss overflows to inf (finite data: the weights
  dataset refuses NaN): the run stops at that step, naming it, with no checkpoint or
  hypernetwork written after it. The same compiled program as the other runs."""
  import train.train_hypernet as entry
  source = weights_dataset.open_dataset(stand_in["data.weights"])
  huge = jax.tree_util.tree_map(lambda x: np.full_like(x, 1e30), source.train)
  weights_dir = str(tmp_path / "huge_weights")
  weights_dataset.write_shard(weights_dir, weights_dataset.shard_name(0, 0, NUM_IDENTITIES),
                              source.identities, huge,
                              {"train_loss": np.zeros(NUM_IDENTITIES, np.float32)},
                              source.spec, source.metadata)
  weights_dataset.finalize(weights_dir, source.identities, source.metadata)
  workdir = tmp_path / "run"
  with pytest.raises(FloatingPointError, match=r"step 1: loss is (inf|nan); stopped"):
    entry.run(_config({**RUN, **stand_in, "data.weights": weights_dir}), str(workdir))
  checkpoints = workdir / "checkpoints"
  assert not checkpoints.exists() or not [p for p in os.listdir(checkpoints) if p.isdigit()]
  assert not (workdir / "hypernet").exists()
