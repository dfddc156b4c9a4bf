"""Hypernetwork training's pieces in this process, on the small model and stand-in targets
of tests/test_hypernet_train.py: steps lower the loss on a fixed batch, per-identity
sampling equals merged weights, learnable aux matrices train and are stored, a frozen
encoder gets no gradient. Apart from the whole runs of test_hypernet_train.py so that both
test workers compile at once."""

import os

import jax
import numpy as np
import optax
import pytest

from hdb_jax import hypernet, hypernet_train, lidb, models, weights_dataset
from test_hypernet_train import REPO, RUN, _config, stand_in  # noqa: F401 (a fixture)


def test_steps_lower_the_loss_on_a_fixed_batch(stand_in):
  """Ten steps on one batch (same noise each step) lower the loss; both terms count."""
  config = _config({**RUN, **stand_in})
  sd, frozen = models.load_or_build(config.model)
  targets = weights_dataset.open_dataset(stand_in["data.weights"])
  aux = lidb.make_aux(targets.spec)
  net = hypernet.make(hypernet.weight_layout(targets.spec), config.hypernet)
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)
  batch = {"images": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
           "face_masks": rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
           "input_ids": np.repeat(sd.tokenize(["a sks face"]), 4, 0),
           "target": jax.tree_util.tree_map(lambda x: x[:4], targets.train)}
  params = jax.jit(lambda key: net.init(key, batch["images"], iterations=1)["params"])(
      jax.random.key(0))
  fns = hypernet_train.make_step(
      net, sd, tx, mesh, hypernet_train.frozen_shardings(frozen, mesh), seed=0,
      loss_kwargs=dict(iterations=2, alpha=1.0, beta=1.0, face_background_weight=0.2))
  # placed as the trainer places it: the step's outputs carry the mesh, so unplaced inputs
  # would compile the step a second time
  state = jax.device_put({"params": params, "opt_state": tx.init(params)}, fns.replicated)
  losses = []
  for _ in range(10):
    state, metrics = fns.train(state, frozen, aux, batch, np.int32(0))
    losses.append(float(metrics["loss"]))
    assert float(metrics["diffusion_loss"]) > 0 and float(metrics["weight_loss"]) > 0
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.slow  # ~40 s: a training run, predict and export of the learnable-aux variant
def test_learnable_aux_trains_the_aux_and_its_files_store_it(tmp_path, stand_in):
  """hypernet.learnable_aux: the aux matrices are params (moved by the diffusion loss),
  predicted LiDB files store them, and they export with them; beta must be 0."""
  import train.train_hypernet as entry
  from hdb_jax import cli, lora
  overrides = {**RUN, **stand_in, "hypernet.learnable_aux": True, "train.beta": 0.0,
               "train.steps": 4}
  with pytest.raises(ValueError, match="beta=0"):
    entry.run(_config({**overrides, "train.beta": 1.0}), str(tmp_path / "refused"))
  assert entry.run(_config(overrides), str(tmp_path))
  net, params, info = hypernet.load(os.path.join(tmp_path, "hypernet"))
  net_params, learned = hypernet.split_aux(params, net.layout)
  seeded = lidb.make_aux(info["lidb_spec"])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), learned, seeded)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4
  out = str(tmp_path / "me.safetensors")
  image = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")
  assert cli.main(["predict", "--hypernet", os.path.join(tmp_path, "hypernet"),
                   "--image", image, "--out", out]) == 0
  with pytest.raises(ValueError, match="learned aux"):
    lidb.load(out)
  train, aux, _, metadata = lidb.load_with_aux(out)
  assert metadata["aux"] == "stored"
  jax.tree_util.tree_map(np.testing.assert_array_equal, aux,
                         jax.tree_util.tree_map(np.asarray, learned))
  exported, _ = lora.read(out)  # what `hdb export` converts
  expected = lidb.factors(train, learned)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                         exported, expected)


def test_per_identity_sampling_equals_merged_weights(stand_in):
  """make_generate_per_identity (one batch, side path, G identities) gives row g what the
  merged weights of identity g give on the same noise."""
  from hdb_jax import dreambooth
  config = _config({**RUN, **stand_in})
  sd, frozen = models.load_or_build(config.model)
  targets = weights_dataset.open_dataset(stand_in["data.weights"])
  aux = lidb.make_aux(targets.spec)
  train = jax.tree_util.tree_map(lambda x: x[:2], targets.train)  # [G=2, ...]
  cond = np.repeat(sd.tokenize(["a sks face"]), 2, 0)
  uncond = np.repeat(sd.tokenize([""]), 2, 0)
  key = jax.random.key(3)
  grouped = np.asarray(dreambooth.make_generate_per_identity(sd, 2)(
      frozen, train, aux, cond, uncond, key, 4.0))
  merged = dreambooth.make_generate(sd, 2)
  for g in range(2):
    one = jax.tree_util.tree_map(lambda x: x[g], train)
    expected = np.asarray(merged(frozen, one, aux, cond, uncond, key, 4.0))[g]
    np.testing.assert_allclose(grouped[g], expected, atol=1e-4)  # measured: 6e-6
  assert np.abs(grouped[0] - grouped[1]).max() > 0.05  # each row had its own weights


@pytest.mark.slow  # ~26 s: the hypernetwork step compiled twice
def test_a_frozen_encoder_gets_no_gradient_and_the_rest_the_same(stand_in):
  """frozen_encoder (encoder_lr_scale 0): the same loss and the same gradients of the rest
  of the network, none taken through the encoder (no activations kept for it). The weight
  loss alone (beta) reaches the encoder as the diffusion loss does, without compiling the
  UNet."""
  config = _config({**RUN, **stand_in})
  sd, frozen = models.load_or_build(config.model)
  targets = weights_dataset.open_dataset(stand_in["data.weights"])
  aux = lidb.make_aux(targets.spec)
  net = hypernet.make(hypernet.weight_layout(targets.spec), config.hypernet)
  rng = np.random.default_rng(1)
  batch = {"images": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
           "input_ids": np.repeat(sd.tokenize(["a sks face"]), 2, 0),
           "target": jax.tree_util.tree_map(lambda x: x[:2], targets.train)}
  params = net.init(jax.random.key(0), batch["images"], iterations=1)["params"]

  def grads(frozen_encoder):
    return jax.jit(jax.value_and_grad(lambda p: hypernet_train.loss_fn(
        net, sd, p, frozen, aux, batch, jax.random.key(2), iterations=2, alpha=0.0,
        beta=1.0, frozen_encoder=frozen_encoder)[0]))(params)

  (loss, trained), (frozen_loss, frozen_grads) = grads(False), grads(True)
  np.testing.assert_allclose(frozen_loss, loss, rtol=1e-6)
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(trained["encoder"])) > 0
  assert all(float(np.abs(g).max()) == 0
             for g in jax.tree_util.tree_leaves(frozen_grads["encoder"]))
  rest = lambda tree: {k: v for k, v in tree.items() if k != "encoder"}
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                         rest(frozen_grads), rest(trained))
