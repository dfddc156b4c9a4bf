"""LiDB DreamBooth on the tiny model: the loss goes down; an interrupted run resumes."""

import json
import os
import signal

import jax
import numpy as np
import optax
import pytest

from hdb_jax import dreambooth, files, lidb
from train import lidb_dreambooth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECT = os.path.join(REPO, "assets", "example_subject")


def test_training_lowers_the_loss(tiny_model, tiny_lidb):
  sd, params = tiny_model
  spec, aux = tiny_lidb
  images = lidb_dreambooth.read_subject_images(SUBJECT, sd.image_size)
  subject = dreambooth.encode_subject(sd, params["vae"], images, hflip=True)
  pools = (dreambooth.make_pool(subject, sd.tokenize(["a sks face"]), 1.0),)
  optimizer = optax.adam(1e-2)
  train = lidb.init(spec, jax.random.key(0))
  opt_state = optimizer.init(train)

  # A fixed evaluation batch (same draws, noise and timesteps before and after).
  eval_loss = jax.jit(lambda t, key: dreambooth.loss_fn(sd, t, params, aux, pools, key, 64))
  eval_keys = jax.random.split(jax.random.key(123), 4)
  evaluate = lambda t: float(np.mean([eval_loss(t, k) for k in eval_keys]))
  before = evaluate(train)
  step = dreambooth.make_train_step(sd, optimizer, batch_size=8)
  for i in range(40):
    train, opt_state, _ = step(train, opt_state, params, aux, pools, jax.random.key(i))
  after = evaluate(train)
  assert after < 0.9 * before, (before, after)


@pytest.fixture(scope="module")
def run_config(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.images = SUBJECT
  config.train.steps = 6
  config.train.checkpoint_every = 3
  config.train.log_every = 1
  config.sample.prompts = ("a sks face",)
  config.sample.per_prompt = 2
  config.sample.num_steps = 2
  config.prior.num_images = 2  # prior preservation on: the base's own class samples
  config.prior.num_steps = 2
  return config


def _signalling_step(steps: int):
  """dreambooth.make_train_step, whose step sends this process SIGTERM after `steps`
  calls: the run's own signal handler (checkpoint.StopFlag) sees it at that step."""
  make = dreambooth.make_train_step

  def make_train_step(*args, **kwargs):
    step_fn, calls = make(*args, **kwargs), []

    def step(*step_args):
      out = step_fn(*step_args)
      calls.append(1)
      if len(calls) == steps:
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return step
  return make_train_step


@pytest.fixture(scope="module")
def uninterrupted(run_config, tmp_path_factory):
  """The weights of an uninterrupted run of run_config."""
  return lidb_dreambooth.run(run_config, str(tmp_path_factory.mktemp("full")))


@pytest.mark.slow  # ~80 s: a whole run, stopped and resumed (its step: tests above)
def test_run_writes_artefacts_and_resumes(run_config, uninterrupted, tmp_path, monkeypatch):

  # SIGTERM during step 2, between checkpoints: it checkpoints step 2 and
  # returns without artefacts; the same command then continues from step 2.
  workdir = str(tmp_path / "resumed")
  monkeypatch.setattr(lidb_dreambooth.dreambooth, "make_train_step", _signalling_step(2))
  assert lidb_dreambooth.run(run_config, workdir) is None
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert not os.path.exists(os.path.join(workdir, "lidb.safetensors"))
  monkeypatch.undo()
  resumed = lidb_dreambooth.run(run_config, workdir)
  with open(os.path.join(workdir, "log.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-2 were not trained twice

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         resumed, uninterrupted)
  train, spec, metadata = lidb.load(os.path.join(workdir, "lidb.safetensors"))
  assert spec.num_trainable == 2896 and metadata["token"] == "sks"
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         train, jax.tree_util.tree_map(np.asarray, resumed))
  assert any(np.abs(w["U_train"]).max() > 0 for w in train["unet"].values())
  from PIL import Image
  with Image.open(os.path.join(workdir, "samples.png")) as grid:
    assert grid.size == (2 * 32 * run_config.sample.upscale, 32 * run_config.sample.upscale)
  assert os.path.exists(os.path.join(workdir, "subject.png"))
  assert os.path.exists(os.path.join(workdir, "prior.png"))


# A child process: run_config's run, whose 5th step sends the process SIGKILL (after the
# checkpoint of step 3, before the one of step 6): no handler, no chance to save more.
_KILLED_CHILD = """
import os, signal, sys, time
from hdb_jax import config_file, dreambooth
from train import lidb_dreambooth
config = config_file.load(os.path.join("configs", "tiny.py"))
config.images, config.train.steps, config.train.checkpoint_every = sys.argv[2], 6, 3
config.train.log_every, config.sample.prompts, config.sample.per_prompt = 1, ("a sks face",), 2
config.sample.num_steps, config.prior.num_images, config.prior.num_steps = 2, 2, 2
make = dreambooth.make_train_step
def make_train_step(*args, **kwargs):
  step_fn, calls = make(*args, **kwargs), []
  def step(*step_args):
    out = step_fn(*step_args)
    calls.append(1)
    if len(calls) == 5:  # once step 3's checkpoint is complete (orbax finishes it
      done = os.path.join(sys.argv[1], "checkpoints", "3")  # in the background)
      while not os.path.isdir(done):
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  return step
dreambooth.make_train_step = make_train_step
lidb_dreambooth.run(config, sys.argv[1])
"""


@pytest.mark.slow  # launches processes: .ci/run runs it after the README command
def test_sigkill_then_the_same_command_equals_an_uninterrupted_run(run_config, uninterrupted,
                                                                     tmp_path):
  """A real SIGKILL at step 5 of 6 (checkpoints every 3 steps): the process dies with
  checkpoint 3 and no artefacts; the same run then resumes from it and ends with the
  uninterrupted run's weights."""
  import subprocess
  import sys
  workdir = str(tmp_path / "killed")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, workdir, SUBJECT], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  assert not os.path.exists(os.path.join(workdir, "lidb.safetensors"))
  resumed = lidb_dreambooth.run(run_config, workdir)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         resumed, uninterrupted)
  train, _, _ = lidb.load(os.path.join(workdir, "lidb.safetensors"))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         train, jax.tree_util.tree_map(np.asarray, resumed))


def test_missing_images_are_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such image file or folder"):
    lidb_dreambooth.read_subject_images(str(tmp_path / "none"), 32)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="folder has no images"):
    lidb_dreambooth.read_subject_images(str(tmp_path / "empty"), 32)
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png: cannot read image"):
    files.read_image(str(broken), 32)


@pytest.mark.slow  # ~24 s: a run made to diverge (README: slow checks)
def test_a_loss_that_is_not_finite_stops_before_checkpointing(run_config, tmp_path):
  config = run_config.copy_and_resolve_references()
  config.train.learning_rate = 1e30  # the first update sends the weights to ~1e30
  with pytest.raises(FloatingPointError, match=r"step \d: loss is (nan|inf)"):
    lidb_dreambooth.run(config, str(tmp_path / "nan"))
  assert not (tmp_path / "nan" / "lidb.safetensors").exists()
