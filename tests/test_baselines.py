"""The table's full-finetune baselines (hdb_jax/baselines.py) on the tiny model: DreamBooth
proper lowers the instance loss and changes the UNet only; Textual Inversion changes one
row of the token table and nothing else."""

import os

import jax
import numpy as np
import optax

from hdb_jax import baselines, dreambooth
from hdb_jax import params as params_lib
from train import lidb_dreambooth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECT = os.path.join(REPO, "assets", "example_subject")


def _pools(sd, params):
  photo = lidb_dreambooth.read_subject_images(SUBJECT, sd.image_size)[:1]
  subject = dreambooth.encode_subject(sd, params["vae"], photo, hflip=True)
  return (dreambooth.make_pool(subject, sd.tokenize(["a sks face"]), 1.0),)


def _table(text_params):
  for key in baselines.TOKEN_TABLE:
    text_params = text_params[key]
  return np.asarray(text_params)


def test_dreambooth_proper_trains_the_unet(tiny_model):
  sd, params = tiny_model
  pools = _pools(sd, params)
  loss = jax.jit(lambda p, key: dreambooth.pools_loss(sd, p, pools, key, 64))
  evaluate = lambda p: float(np.mean([loss(p, k) for k in jax.random.split(
      jax.random.key(7), 4)]))
  tx = optax.adam(1e-3)
  step = baselines.make_finetune_step(sd, tx, batch_size=4)
  unet_before = jax.tree_util.tree_map(np.array, params["unet"])  # host copies
  trained = baselines.dreambooth_finetune(step, tx, params, pools, steps=30, seed=0)
  assert evaluate({**params, **trained}) < 0.9 * evaluate(params)
  # The whole UNet learns: every kernel moved...
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                 trained["unet"], unet_before)
  kernels = {k: v for k, v in params_lib.flatten(moved).items() if k.endswith("kernel")}
  assert len(kernels) > 50 and all(kernels.values()), [k for k, v in kernels.items() if not v]
  # ...while the base it started from is intact: the step donates what it trains, so
  # training the base's own arrays would delete or overwrite them.
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["unet"], unet_before)


def test_textual_inversion_changes_one_token_row(tiny_model):
  sd, params = tiny_model
  token_id = int(sd.tokenize(["sks"])[0][1])
  tx = optax.adam(1e-2)
  step = baselines.make_inversion_step(sd, tx, batch_size=2, token_id=token_id)
  trained = baselines.textual_inversion(step, tx, params, _pools(sd, params), token_id,
                                        steps=5, seed=0)
  before, after = _table(params["text_encoder"]), _table(trained["text_encoder"])
  changed = np.flatnonzero(np.any(before != after, axis=1))
  assert changed.tolist() == [token_id]
  rest = lambda p: {k: v for k, v in p["text_model"].items() if k != "embeddings"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, rest(trained["text_encoder"]),
                         rest(params["text_encoder"]))
