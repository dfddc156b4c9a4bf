"""HyperNetwork module (hdb_jax/hypernet.py): its output is exactly the LiDB train
pytree of the spec, the iterations are respected, weight tokens round-trip."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hdb_jax import config_file, hypernet, lidb, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mini_spec():
  config = config_file.load(os.path.join(REPO, "configs", "mini.py"))
  _, abstract = models.from_config(config.model)
  cfg = config.lidb
  return lidb.make_spec(abstract, seed=cfg.seed, a=cfg.a, b=cfg.b, rank=cfg.rank,
                        targets=dict(cfg.targets))


@pytest.fixture(scope="module")
def small_net(mini_spec):
  cfg = ml_collections.ConfigDict(dict(
      width=32, depth=1, heads=2, encoder=dict(patch=8, width=32, depth=1, heads=2)))
  net = hypernet.make(hypernet.weight_layout(mini_spec), cfg)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  variables = net.init(jax.random.key(0), images, iterations=1)
  return net, variables, images


def test_layout_groups_layers_by_size_without_padding(mini_spec):
  layout = hypernet.weight_layout(mini_spec)
  assert layout.num_layers == mini_spec.num_layers
  assert sum(size * len(indices) for size, indices in layout.groups) == mini_spec.num_trainable
  assert sorted(i for _, indices in layout.groups for i in indices) == list(
      range(layout.num_layers))


def test_tokens_round_trip(mini_spec):
  layout = hypernet.weight_layout(mini_spec)
  keys = jax.random.split(jax.random.key(0), 3)
  train = jax.vmap(lambda k: jax.tree_util.tree_map(
      lambda x: x + jax.random.normal(k, x.shape), lidb.init(mini_spec, k)))(keys)
  back = hypernet.from_tokens(hypernet.to_tokens(train, layout), layout)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(train)
  for x, y in zip(jax.tree_util.tree_leaves(train), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(x, y)


def test_output_is_the_spec_train_pytree_and_iterations_count(mini_spec, small_net):
  net, variables, images = small_net
  predicted = net.apply(variables, images, iterations=2)
  reference = lidb.init(mini_spec, jax.random.key(0))
  assert jax.tree_util.tree_structure(predicted) == jax.tree_util.tree_structure(reference)
  for p, r in zip(jax.tree_util.tree_leaves(predicted), jax.tree_util.tree_leaves(reference)):
    assert p.shape == (2,) + r.shape
  zero = net.apply(variables, images, iterations=0)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(zero))
  one = net.apply(variables, images, iterations=1)
  size = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))
  assert 0.0 < size(one) < 0.05   # the head starts small
  assert size(jax.tree_util.tree_map(jnp.subtract, predicted, one)) > 0  # iteration 2 adds
  # The two images get different weights: the prediction depends on the image.
  first = jax.tree_util.tree_map(lambda x: x[0], one)
  second = jax.tree_util.tree_map(lambda x: x[1], one)
  assert size(jax.tree_util.tree_map(jnp.subtract, first, second)) > 0


def test_weight_loss(mini_spec):
  train = jax.vmap(lambda k: lidb.init(mini_spec, k))(jax.random.split(jax.random.key(0), 2))
  assert np.allclose(hypernet.weight_loss(train, train), 0.0)
  shifted = jax.tree_util.tree_map(lambda x: x + 2.0, train)
  np.testing.assert_allclose(hypernet.weight_loss(shifted, train), 4.0, rtol=1e-6)


@pytest.mark.slow  # ~28 s: the SD1.5 configs' CLIP encoder variant, built and saved
def test_pretrained_clip_encoder_loads_frozen_and_round_trips(mini_spec, tmp_path):
  """A local CLIP vision folder as the encoder: its weights go into params["encoder"],
  encoder_lr_scale=0 keeps them fixed, and a saved hypernetwork rebuilds it."""
  import optax
  import torch
  from transformers import CLIPVisionConfig, CLIPVisionModel
  from hdb_jax import hypernet_train
  clip_dir = str(tmp_path / "clip")  # a PyTorch CLIPVisionModel folder, as users have them
  torch.manual_seed(0)
  CLIPVisionModel(CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8)).save_pretrained(clip_dir, safe_serialization=True)
  cfg = ml_collections.ConfigDict(dict(
      width=32, depth=1, heads=2, iterations=1, encoder=dict(kind="clip", path=clip_dir)))
  encoder, encoder_params, encoder_config = hypernet.make_encoder(cfg.encoder)
  net = hypernet.make(hypernet.weight_layout(mini_spec), cfg, encoder)
  images = jnp.zeros((1, 32, 32, 3))
  params = dict(net.init(jax.random.key(0), images, iterations=1)["params"],
                encoder=encoder_params)
  tx = hypernet_train.optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup=1, steps=10, clip=1.0, weight_decay=0.0,
      encoder_lr_scale=0.0)))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, tx.init(params), params)  # warmup: lr 0 at step 0
  updates, _ = tx.update(grads, opt_state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates["encoder"]))
  assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(updates["head_64"]))
  out = str(tmp_path / "hypernet")
  hypernet.save(out, params, cfg, mini_spec, "fp", "a sks face",
                extra={"image_size": 32, "encoder_config": encoder_config})
  loaded, loaded_params, info = hypernet.load(out)
  for x, y in zip(
      jax.tree_util.tree_leaves(loaded.apply({"params": loaded_params}, images, iterations=1)),
      jax.tree_util.tree_leaves(net.apply({"params": params}, images, iterations=1))):
    np.testing.assert_allclose(x, y, atol=1e-6)
  with pytest.raises(ValueError, match="encoder.path"):
    hypernet.make_encoder(ml_collections.ConfigDict(dict(kind="clip", path="")))


@pytest.mark.parametrize("network,evaluation", [
    ("mini_hypernet", "mini_hypernet_eval.json"),        # the committed one
    ("mini_hypernet_5k", "mini_hypernet_5k_eval.json")])  # the comparison table's
def test_committed_hypernetwork_and_its_evaluation(network, evaluation):
  """assets/<network> is the network docs/<evaluation> measured, made for the committed
  base; the measurement covers s = 1..8, shows identity gained and context kept at s = 4
  (as trained), and the issue's target (base + 0.12 identity, context within 5 points)
  reached at some s."""
  import json
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _, _, info = hypernet.load(os.path.join(repo, "assets", network))
  with open(os.path.join(repo, "docs", evaluation)) as f:
    measured = json.load(f)
  assert info["fingerprint"] == measured["hypernet_fingerprint"]
  assert info["base_fingerprint"] == measured["base_fingerprint"]
  assert measured["num_identities"] >= 100 and measured["split"] == "holdout"
  rows = measured["rows"]
  assert {f"hypernet_s{s}" for s in (1, 2, 4, 8)} <= set(rows)
  kept = lambda row: row["background_accuracy_drop"] < 0.05 and row["style_accuracy_drop"] < 0.05
  assert rows["hypernet_s4"]["identity_gain_plain"] > 0.05 and kept(rows["hypernet_s4"])
  assert any(row["identity_gain_plain"] >= 0.12 and kept(row)
             for name, row in rows.items() if name.startswith("hypernet_s"))
