"""Rank-relaxed fast finetuning (hdb_jax/finetune.py) on the tiny model: the relaxed start
is the prediction exactly, training lowers the loss, a frozen text encoder stays put."""

import os

import jax
import numpy as np
import pytest

from hdb_jax import dreambooth, finetune, lidb, lora
from train import lidb_dreambooth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECT = os.path.join(REPO, "assets", "example_subject")


def test_fast_finetune_from_a_relaxed_prediction(tiny_model, tiny_lidb):
  sd, params = tiny_model
  spec, aux = tiny_lidb
  keys = jax.random.split(jax.random.key(0), 2)
  predicted = jax.tree_util.tree_map(  # a stand-in prediction: nonzero residuals
      lambda x: x + 0.05 * jax.random.normal(keys[1], x.shape), lidb.init(spec, keys[0]))
  start = finetune.initial_lora(predicted, aux, rank=4)
  assert all(f["down"].shape[1] == 4 for layers in start.values() for f in layers.values())
  for component, residuals in lidb.deltas(predicted, aux).items():
    for layer, residual in residuals.items():
      np.testing.assert_allclose(lora.deltas(start)[component][layer], residual, atol=1e-5)

  photo = lidb_dreambooth.read_subject_images(SUBJECT, sd.image_size)[:1]  # one photo
  subject = dreambooth.encode_subject(sd, params["vae"], photo, hflip=True)
  pools = (dreambooth.make_pool(subject, sd.tokenize(["a sks face"]), 1.0),)
  eval_loss = jax.jit(lambda l, key: dreambooth.pools_loss(sd, lora.merge(params, l), pools,
                                                           key, 64))
  evaluate = lambda l: float(np.mean([eval_loss(l, k) for k in jax.random.split(
      jax.random.key(123), 4)]))
  tuned, losses = finetune.finetune(sd, params, start, pools, steps=40, learning_rate=1e-2,
                                    batch_size=4, seed=0, train_text_encoder=False)
  assert len(losses) == 40 and np.all(np.isfinite(losses))
  assert evaluate(tuned) < 0.9 * evaluate(start), (evaluate(start), evaluate(tuned))
  jax.tree_util.tree_map(np.testing.assert_array_equal, tuned["text_encoder"],
                         jax.tree_util.tree_map(np.asarray, start["text_encoder"]))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), tuned["unet"],
                                 start["unet"])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
  lora.check(jax.tree_util.tree_map(np.asarray, tuned))  # a valid LoRA for lora.save/export


def test_a_loss_that_is_not_finite_stops_the_finetuning():
  def exploding_step(trained, opt_state, fixed, frozen, pools, rng):
    return trained, opt_state, np.float32(np.nan)
  with pytest.raises(FloatingPointError, match="loss is nan at step 1 of 3"):
    finetune.train(exploding_step, {"w": np.zeros(2)}, (), {}, {}, (), steps=3, seed=0)
