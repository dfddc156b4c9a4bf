"""Pre-optimization: side path == merge, weights dataset, and whole runs that must agree:
1 vs 8 devices, killed (SIGTERM, then SIGKILL) and resumed vs uninterrupted, 2 processes
vs 1.

Runs use a model smaller than configs/tiny.py (one UNet block, one text layer) on
synthetic_faces/tiny. The 1-device reference runs in this process; the others run
`python -m train.preoptimize` in subprocesses (8 fake CPU devices need XLA_FLAGS before
JAX starts) that share this session's XLA compilation cache.

Tolerance (weights are ~0.01-1; one Adam step moves a value by up to lr = 5e-3, so a
wrong noise draw, step count or identity shows up far above it):
- the same compiled program (killed and resumed vs uninterrupted): atol 1e-6 (measured: 0);
- other programs (1 device x 2 identities vs 8 devices x 1; 2 processes x 4 devices vs
  1 x 8; XLA may reassociate sums differently, and Adam amplifies that noise where a
  gradient is near zero): atol 1e-3 (measured: 6e-6 for 1 vs 8 devices, 0 for 2
  processes vs 1; up to 2e-4 once between the same run compiled under other XLA_FLAGS).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hdb_jax import config_file, lidb, preopt, weights_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDENTITIES = 16
RUN = {  # config overrides shared by every run (dotted keys)
    "model.unet.block_out_channels": (32,),
    "model.unet.down_block_types": ("CrossAttnDownBlock2D",),
    "model.unet.up_block_types": ("CrossAttnUpBlock2D",),
    "model.text_encoder.num_hidden_layers": 1,
    "data.source": "synthetic_faces", "data.config": "tiny",
    "data.max_identities": NUM_IDENTITIES,
    "preopt.steps": 6, "preopt.learning_rate": 5e-3,
    "preopt.per_device_block": 2, "preopt.checkpoint_every_blocks": 1,
    "preopt.eval_batch_size": 0,
}
EIGHT_DEVICES = {"preopt.per_device_block": 1}
SAME_PROGRAM_ATOL = 1e-6
OTHER_PROGRAM_ATOL = 1e-3


def _config(overrides):
  return config_file.load(os.path.join(REPO, "configs", "preopt_mini.py:tiny"), overrides)


def _flags(overrides):
  return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in overrides.items()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from hdb_jax import data
  from hdb_jax.mini import dataset
  path = str(tmp_path_factory.mktemp("tfds"))
  dataset.build("tiny", path)
  return path


def _launch(workdir, overrides, devices=1, extra_env=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if devices > 1:  # 1 device: this process's flags, so that its compiled programs are reused
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra_env or {})
  command = [sys.executable, "-m", "train.preoptimize",
             "--config", os.path.join(REPO, "configs", "preopt_mini.py:tiny"),
             "--workdir", str(workdir)] + _flags(overrides)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=600):
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def _shards(workdir):
  return {name for name, *_ in weights_dataset.list_shards(os.path.join(workdir, "weights"))}


def _wait_for_new_shard(process, workdir, known):
  while process.poll() is None:
    if _shards(workdir) - known:
      return True
    time.sleep(0.02)
  return False


def _assert_same_weights(dir_a, dir_b, atol, same_train_loss=True):
  a = weights_dataset.open_dataset(os.path.join(dir_a, "weights"))
  b = weights_dataset.open_dataset(os.path.join(dir_b, "weights"))
  np.testing.assert_array_equal(a.identities, b.identities)
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a.train),
                               jax.tree_util.tree_leaves_with_path(b.train)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
  if same_train_loss:  # a resumed block averages fewer steps
    np.testing.assert_allclose(a.stats["train_loss"], b.stats["train_loss"], rtol=1e-4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  """1 device, 2 identities per block, in this process, with the eval losses."""
  import train.preoptimize as entry
  workdir = str(tmp_path_factory.mktemp("preopt_ref"))
  config = _config({**RUN, "data.data_dir": data_dir, "preopt.eval_batch_size": 4})
  assert entry.run(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("preopt_8"))
  code, out = _finish(_launch(workdir, {**RUN, **EIGHT_DEVICES, "data.data_dir": data_dir},
                              devices=8))
  assert code == 0, out[-3000:]
  return workdir


# ------------------------------------------------------------------------------------
# Pieces

def test_face_pixel_weights():
  """Full coverage -> 1, none -> the background weight, a half-covered latent cell -> the
  mean; the latent grid is the image grid pooled."""
  masks = np.zeros((1, 32, 32), np.uint8)
  masks[0, :8, :] = 255          # latent rows 0-1 fully covered (factor 4)
  masks[0, 8:10, :] = 255        # latent row 2 half covered
  weights = np.asarray(preopt.face_pixel_weights(masks, 8, 0.1))
  assert weights.shape == (1, 8, 8)
  np.testing.assert_allclose(weights[0, :2], 1.0, atol=1e-6)
  np.testing.assert_allclose(weights[0, 2], 0.55, atol=1e-6)
  np.testing.assert_allclose(weights[0, 3:], 0.1, atol=1e-6)


def test_side_path_reports_layers_never_called():
  import flax.linen as nn
  dense = nn.Dense(3, name="to_q")
  x = np.ones((1, 2), np.float32)
  variables = dense.init(jax.random.key(0), x)
  factors = {"unet": {"elsewhere/to_q": {"down": np.ones((2, 1)), "up": np.ones((1, 3))}}}
  with pytest.raises(ValueError, match="never called"):
    with preopt.low_rank_side_path(factors):
      dense.apply(variables, x)


def test_weights_dataset_round_trip_and_checks(tmp_path, tiny_lidb):
  spec, _ = tiny_lidb
  rows = lambda n, seed: jax.vmap(lambda k: lidb.init(spec, k))(
      jax.random.split(jax.random.key(seed), n))
  train_a, train_b = rows(3, 0), rows(2, 1)
  folder = str(tmp_path)
  stats = np.arange(15, dtype=np.float32).reshape(5, 3)  # columns: strided views
  weights_dataset.write_shard(folder, weights_dataset.shard_name(1, 3, 5), [7, 2], train_b,
                              {"train_loss": stats[3:, 0]}, spec)
  with pytest.raises(ValueError, match="miss 3 identities"):
    weights_dataset.finalize(folder, [7, 2, 5, 9, 4])
  weights_dataset.write_shard(folder, weights_dataset.shard_name(0, 0, 3), [5, 9, 4], train_a,
                              {"train_loss": stats[:3, 0]}, spec)
  with pytest.raises(FileNotFoundError, match="index.json"):
    weights_dataset.open_dataset(folder)
  index = weights_dataset.finalize(folder, [7, 2, 5, 9, 4])
  assert index["num_identities"] == 5 and len(index["shards"]) == 2
  dataset = weights_dataset.open_dataset(folder)
  assert dataset.spec == spec
  np.testing.assert_array_equal(dataset.identities, [2, 4, 5, 7, 9])
  np.testing.assert_array_equal(dataset.stats["train_loss"], [12, 6, 0, 9, 3])
  layer = next(iter(spec.layers["unet"]))
  np.testing.assert_array_equal(dataset.get(9)["unet"][layer]["D_train"],
                                np.asarray(train_a["unet"][layer]["D_train"][1]))
  with pytest.raises(KeyError):
    dataset.get(3)
  # A second copy of an identity (a stale shard) is an error, and stale shards are removable.
  weights_dataset.write_shard(folder, weights_dataset.shard_name(0, 3, 4), [7], rows(1, 2),
                              {"train_loss": stats[:1, 0]}, spec)
  with pytest.raises(ValueError, match="identity 7"):
    weights_dataset.finalize(folder, [7, 2, 5, 9, 4])
  assert weights_dataset.remove_shards_from(folder, 3) == [
      weights_dataset.shard_name(0, 3, 4), weights_dataset.shard_name(1, 3, 5)]


def test_layout_rows_and_padding():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  layout = preopt.make_layout(10, 4, sharding)
  assert layout.num_blocks == 3
  np.testing.assert_array_equal(layout.local_positions(2), [8, 9, 10, 11])


def test_committed_benchmark_meets_targets():
  """benchmarks/results (benchmarks/preopt.py, docs/benchmarks.md): block 16 >= 2x the
  one-identity loop, and peak memory of block 16 <= 1.5x block 1."""
  import json
  for name in ("preopt_tiny.json", "preopt_mini_arch.json"):
    with open(os.path.join(REPO, "benchmarks", "results", name)) as f:
      rows = {r["what"]: r for r in json.load(f)["results"]}
    assert rows["side:16"]["speedup_vs_loop"] >= 2.0, name
    assert rows["side:16"]["peak_rss_mb"] <= 1.5 * rows["side:1"]["peak_rss_mb"], name


# ------------------------------------------------------------------------------------
# Whole runs

def test_reference_run_writes_dataset_and_summary(reference_run):
  import json
  dataset = weights_dataset.open_dataset(os.path.join(reference_run, "weights"))
  assert len(dataset) == NUM_IDENTITIES
  assert set(dataset.stats) == {"train_loss", "eval_loss_before", "eval_loss_after"}
  layer = next(iter(dataset.spec.layers["unet"]))
  assert np.abs(dataset.train["unet"][layer]["U_train"]).min(axis=(1, 2)).max() > 0
  with open(os.path.join(reference_run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["num_identities"] == NUM_IDENTITIES
  assert 0.0 <= summary["fraction_eval_loss_improved"] <= 1.0
  # One identity's row is a complete LiDB file.
  path = os.path.join(reference_run, "one.safetensors")
  lidb.save(path, dataset.get(int(dataset.identities[0])), dataset.spec)
  assert lidb.load(path)[1] == dataset.spec


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_target_probe_and_repeatability_on_the_reference_run(reference_run, eight_device_run):
  """train/analyze_targets.py, the code that made docs/mini_preopt_targets.json and
  mini_preopt_repeatability.json, on the 16 identities of the reference run: the same
  fields, R^2 at most 1, and two runs of the same identities and noise agree."""
  from train import analyze_targets
  with open(os.path.join(REPO, "docs", "mini_preopt_targets.json")) as f:
    committed = json.load(f)
  weights = os.path.join(reference_run, "weights")
  metrics = analyze_targets.run(weights, 12, [1.0, 10.0, 100.0])
  assert sorted(metrics) == sorted(k for k in committed if k != "command")
  assert sorted(metrics["held_out_r2"]) == sorted(committed["held_out_r2"])
  assert metrics["identities"] == NUM_IDENTITIES and metrics["held_out"] == 4
  assert all(r2 <= 1.0 for r2 in metrics["held_out_r2"].values())
  assert 0 < metrics["variance_across_identities"] <= metrics["mean_square"]
  top = metrics["variance_fraction_top_directions"]
  assert top["1"] <= top["5"] <= top["20"] <= top["100"] and abs(top["100"] - 1.0) < 1e-9
  with open(os.path.join(REPO, "docs", "mini_preopt_repeatability.json")) as f:
    committed = json.load(f)["variants"]["adam lr 5e-3"]
  again = analyze_targets.repeatability(weights, os.path.join(eight_device_run, "weights"))
  assert set(again) <= set(committed) and again["identities"] == NUM_IDENTITIES
  assert again["repeatable_fraction"] > 0.999  # the same training, other devices
  with pytest.raises(ValueError, match="--fit"):
    analyze_targets.run(weights, NUM_IDENTITIES, [1.0])


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_one_vs_eight_devices(reference_run, eight_device_run):
  _assert_same_weights(reference_run, eight_device_run, OTHER_PROGRAM_ATOL)


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_provenance_records_what_made_the_weights(reference_run, eight_device_run):
  """provenance.json beside the weights: the resolved config, the identities read and a
  fingerprint of their photos (the same data on 1 and 8 devices: the same fingerprint),
  the steps and the code commit of this checkout."""
  from hdb_jax import provenance
  records = []
  for workdir in (reference_run, eight_device_run):
    with open(os.path.join(workdir, provenance.FILE)) as f:
      records.append(json.load(f))
  mine, theirs = records
  assert mine["steps"] == RUN["preopt.steps"] and mine["config"]["preopt"]["steps"] == 6
  assert mine["config"]["data"]["max_identities"] == NUM_IDENTITIES
  identities = weights_dataset.open_dataset(os.path.join(reference_run, "weights")).identities
  assert mine["data"]["identities"] == provenance.identity_ranges(identities)
  assert mine["data"]["num_identities"] == NUM_IDENTITIES
  assert mine["data"]["source"] == "synthetic_faces/tiny:train"
  assert mine["data"]["fingerprint"] == theirs["data"]["fingerprint"]
  assert theirs["command"].startswith("python -m train.preoptimize --config configs/")
  head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  assert mine["code"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path, data_dir,
                                                               reference_run):
  workdir = str(tmp_path / "killed")
  overrides = {**RUN, "data.data_dir": data_dir}
  # SIGTERM mid-run: checkpoint, clean exit 0, no index (not finished).
  process = _launch(workdir, overrides)
  assert _wait_for_new_shard(process, workdir, set())
  process.send_signal(signal.SIGTERM)
  code, out = _finish(process)
  assert code == 0 and "stopped: progress saved" in out, out[-3000:]
  assert not os.path.exists(os.path.join(workdir, "weights", weights_dataset.INDEX))
  # Rerun resumes the block in flight; SIGKILL it after it wrote one more shard.
  known = _shards(workdir)
  process = _launch(workdir, overrides)
  assert _wait_for_new_shard(process, workdir, known)
  process.send_signal(signal.SIGKILL)
  code, out = _finish(process)
  assert code == -signal.SIGKILL and "resuming block" in out, out[-3000:]
  # The same command finishes the run.
  code, out = _finish(_launch(workdir, overrides))
  assert code == 0, out[-3000:]
  _assert_same_weights(reference_run, workdir, SAME_PROGRAM_ATOL, same_train_loss=False)


def test_extend_a_finished_dataset_equals_one_run(tmp_path, data_dir, reference_run):
  """A dataset of the first 6 identities extended to all 16 in a new workdir: the same
  weights as one run of 16; a source made with other settings is refused by name."""
  import train.preoptimize as entry
  overrides = {**RUN, "data.data_dir": data_dir, "preopt.eval_batch_size": 4}
  first = str(tmp_path / "first")
  assert entry.run(_config({**overrides, "data.max_identities": 6}), first)
  source = os.path.join(first, "weights")
  extended = str(tmp_path / "extended")
  assert entry.run(_config({**overrides, "preopt.extend": source}), extended)
  _assert_same_weights(reference_run, extended, SAME_PROGRAM_ATOL)
  with open(os.path.join(extended, "summary.json")) as f:
    assert json.load(f)["identities_this_run"] == NUM_IDENTITIES - 6
  for changed, what in (({"preopt.learning_rate": 1e-2}, "learning_rate"),
                        ({"preopt.hflip": False}, "optimization")):
    with pytest.raises(ValueError, match=f"first/weights: made with another {what}"):
      entry.run(_config({**overrides, **changed, "preopt.extend": source}),
                str(tmp_path / what))
  with pytest.raises(ValueError, match="are not the first 6"):
    entry.run(_config({**overrides, "data.max_identities": 4, "preopt.extend": source}),
              str(tmp_path / "fewer"))


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_two_processes_equal_one(tmp_path, data_dir, eight_device_run):
  """2 processes x 4 devices (gloo) == 1 process x 8 devices: the same global blocks."""
  workdir = str(tmp_path / "two")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  overrides = {**RUN, **EIGHT_DEVICES, "data.data_dir": data_dir,
               "distributed.initialize": True, "distributed.cpu_collectives": "gloo",
               "distributed.coordinator_address": f"127.0.0.1:{port}",
               "distributed.num_processes": 2}
  processes = [_launch(workdir, {**overrides, "distributed.process_id": i}, devices=4)
               for i in range(2)]
  results = [_finish(p) for p in processes]
  for code, out in results:
    assert code == 0, out[-3000:]
  names = _shards(workdir)
  assert any("-p00000-" in n for n in names) and any("-p00001-" in n for n in names)
  _assert_same_weights(eight_device_run, workdir, OTHER_PROGRAM_ATOL)


def test_identity_evaluation_of_a_run(reference_run, data_dir):
  """train/eval_preopt on the reference run: a row per identity (its reference photo, base
  samples, LiDB samples), accuracies in range, and weights of another base are refused."""
  import train.eval_preopt as eval_preopt
  from hdb_jax import data
  from hdb_jax.mini import dataset
  config = _config({**RUN, "data.data_dir": data_dir})
  weights = os.path.join(reference_run, "weights")
  metrics, grid = eval_preopt.run(config, weights, num_identities=2, per_identity=2,
                                  num_steps=2, guidance_scale=4.0, seed=0)
  assert metrics["num_identities"] == 2 and grid.shape == (2 * (1 + 2 * 2), 32, 32, 3)
  first = metrics["per_identity"][0]
  for name in ("base", "preoptimized"):
    assert 0.0 <= first[name] <= 1.0
  records = dataset.source("tiny", "train", data_dir)
  start = {i: s for i, s, _ in data.identity_ranges(records)}[first["identity"]]
  np.testing.assert_allclose(grid[0], records[start]["image"] / 127.5 - 1.0, atol=1e-6)
  other_base = _config({**RUN, "data.data_dir": data_dir, "model.init_seed": 1})
  with pytest.raises(ValueError, match="pre-optimized on base"):
    eval_preopt.run(other_base, weights, 1, 1, 2, 4.0, 0)


def test_identifier_prompt_and_prompt_ids(tiny_model):
  import train.preoptimize as entry
  sd, _ = tiny_model
  assert entry.identifier_prompt("a sketch of a face on a blue background", "sks", "face") \
      == "a sketch of a sks face on a blue background"
  with pytest.raises(ValueError, match="no class word"):
    entry.identifier_prompt("a sketch of a dog", "sks", "face")
  images = np.zeros((2, 2, 32, 32, 3), np.uint8)
  fixed = entry.prompt_ids(sd, {"images": images, "captions": None}, "a sks face", "sks",
                           "face")
  assert fixed.shape == (2, 2, sd.max_length) and (fixed == fixed[0, 0]).all()
  per_image = entry.prompt_ids(sd, {"images": images, "captions": [
      ["a face", "a sketch of a face"], ["a face on a pink background", "a face"]]},
      "a sks face", "sks", "face")
  np.testing.assert_array_equal(per_image[0, 0], fixed[0, 0])
  assert not (per_image[0, 1] == fixed[0, 0]).all()


def test_views_with_captions_and_face_mask(tmp_path, data_dir, reference_run):
  """Every view of an identity with its own caption (+ identifier) and the face-masked
  loss: the run completes and learns other weights than the one-photo reference."""
  import train.preoptimize as entry
  config = _config({**RUN, "data.data_dir": data_dir, "data.max_identities": 2,
                    "data.num_images": 3, "data.photo_style": -1, "data.captions": True,
                    "preopt.face_background_weight": 0.1})
  assert entry.run(config, str(tmp_path))
  views = weights_dataset.open_dataset(os.path.join(tmp_path, "weights"))
  reference = weights_dataset.open_dataset(os.path.join(reference_run, "weights"))
  np.testing.assert_array_equal(views.identities, reference.identities[:2])
  difference = max(float(np.abs(x - y[:2]).max()) for x, y in zip(
      jax.tree_util.tree_leaves(views.train), jax.tree_util.tree_leaves(reference.train)))
  assert difference > 1e-4


def test_face_mask_needs_records_with_masks(tmp_path):
  import train.preoptimize as entry
  config = _config({**RUN, "data.source": "random", "data.random_identities": 2,
                    "preopt.face_background_weight": 0.1})
  with pytest.raises(ValueError, match="no face_mask"):
    entry.run(config, str(tmp_path))


@pytest.mark.slow  # a preoptimization step compiled for its own learning rate
def test_a_run_whose_loss_is_not_finite_writes_no_weights(tmp_path, data_dir):
  """A real run that diverges (learning rate 1e30: Adam moves every weight by ~1e30, the
  loss overflows): it stops naming the identities, and no weights are written."""
  import train.preoptimize as entry
  config = _config({**RUN, "data.data_dir": data_dir, "data.max_identities": 2,
                    "preopt.learning_rate": 1e30})
  with pytest.raises(FloatingPointError, match=r"the loss of identities \[.*\] is not"):
    entry.run(config, str(tmp_path))
  assert not _shards(str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "weights", "index.json"))


def test_a_loss_that_is_not_finite_stops_before_writing():
  preopt.check_finite(np.array([0.1, 0.2]), np.array([3, 4]), "block", "w")  # fine
  with pytest.raises(FloatingPointError, match=r"block: the loss of identities \[4\] is not"):
    preopt.check_finite(np.array([0.1, np.nan]), np.array([3, 4]), "block", "w")
