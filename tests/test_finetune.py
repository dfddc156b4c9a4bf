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


def _shapes(aux):
  return finetune.layer_shapes(aux)


def test_random_init_is_peft_default_lora_init(tiny_lidb):
  """lora.random_init (finetune.random_start on the LiDB layers) as peft's default
  (`reset_lora_parameters`, init_lora_weights=True): zero `up`, so a zero residual;
  `down [in, r]` uniform in +-1/sqrt(in) (kaiming-uniform, a = sqrt(5), fan_in = in), every
  row nonzero; deterministic per seed and layer path, other seeds and layers differ."""
  _, aux = tiny_lidb
  rank = 4
  start = finetune.random_start(aux, rank, seed=0)
  assert lora.layer_shapes(start) == _shapes(aux)
  assert sorted(start) == sorted(aux) and all(sorted(start[c]) == sorted(aux[c]) for c in aux)
  downs = []
  for component, layers in start.items():
    for layer, f in layers.items():
      in_dim, out_dim = _shapes(aux)[component][layer]
      assert f["down"].shape == (in_dim, rank) and f["up"].shape == (rank, out_dim)
      assert f["down"].dtype == f["up"].dtype == np.float32
      np.testing.assert_array_equal(f["up"], 0.0)
      np.testing.assert_array_equal(lora.deltas(start)[component][layer], 0.0)
      bound = 1.0 / np.sqrt(in_dim)
      assert np.abs(f["down"]).max() <= bound
      assert np.all(np.abs(f["down"]).max(axis=1) > 0), (component, layer)  # rows nonzero
      downs.append(f["down"].ravel() / bound)                   # U(-1, 1) when pooled
  pooled = np.concatenate(downs)
  assert pooled.size > 2000
  # U(-1, 1): mean 0, variance 1/3, reaching the bound, flat (each quarter ~1/4)
  assert abs(pooled.mean()) < 0.05 and abs(pooled.var() - 1 / 3) < 0.03
  assert pooled.min() < -0.98 and pooled.max() > 0.98
  counts = np.histogram(pooled, bins=4, range=(-1, 1))[0] / pooled.size
  np.testing.assert_allclose(counts, 0.25, atol=0.03)
  # Deterministic per seed; another seed, or another layer of the same shape, differs.
  again = finetune.random_start(aux, rank, seed=0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, start)
  other = finetune.random_start(aux, rank, seed=1)
  for component, layers in start.items():
    for layer, f in layers.items():
      assert not np.array_equal(other[component][layer]["down"], f["down"])
  same_shape = [f["down"] for f in start["unet"].values()
                if f["down"].shape == next(iter(start["unet"].values()))["down"].shape]
  assert len(same_shape) > 1 and not np.array_equal(same_shape[0], same_shape[1])
  # A layer's values follow its seed and path alone (not the other layers present).
  component, layer = "unet", sorted(start["unet"])[-1]
  alone = lora.random_init({component: {layer: _shapes(aux)[component][layer]}}, rank, 0)
  np.testing.assert_array_equal(alone[component][layer]["down"], start[component][layer]["down"])
  # 1x1 convolutions: [1, 1, in, r] and [1, 1, r, out], fan_in = in.
  conv = lora.random_init({"unet": {"conv": (1, 1, 16, 8)}}, 2, 0)["unet"]["conv"]
  assert conv["down"].shape == (1, 1, 16, 2) and conv["up"].shape == (1, 1, 2, 8)
  assert np.abs(conv["down"]).max() <= 0.25 and not conv["up"].any()


def test_random_init_bound_is_torch_kaiming_uniform_with_a_sqrt5():
  """The bound 1/sqrt(in) is what torch's kaiming_uniform_(w, a=sqrt(5)) uses on peft's
  lora_A [r, in] (its fan_in: in)."""
  torch = pytest.importorskip("torch")
  import math
  for in_dim in (8, 40, 320):
    weight = torch.empty(4, in_dim)
    fan_in = torch.nn.init._calculate_correct_fan(weight, "fan_in")
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
    assert abs(bound - 1.0 / math.sqrt(in_dim)) < 1e-9
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    assert float(weight.abs().max()) <= bound
    ours = lora.random_init({"c": {"l": (in_dim, 3)}}, 4, 0)["c"]["l"]["down"]
    assert np.abs(ours).max() <= bound


def test_fast_finetune_from_the_random_init_lowers_the_loss(tiny_model, tiny_lidb):
  """A few steps from the usual LoRA init (zero residual) lower the diffusion loss on the
  photo, and both factors learn."""
  sd, params = tiny_model
  _, aux = tiny_lidb
  start = finetune.random_start(aux, 4, seed=0)
  photo = lidb_dreambooth.read_subject_images(SUBJECT, sd.image_size)[:1]
  subject = dreambooth.encode_subject(sd, params["vae"], photo, hflip=True)
  pools = (dreambooth.make_pool(subject, sd.tokenize(["a sks face"]), 1.0),)
  eval_loss = jax.jit(lambda l, key: dreambooth.pools_loss(sd, lora.merge(params, l), pools,
                                                           key, 64))
  evaluate = lambda l: float(np.mean([eval_loss(l, k) for k in jax.random.split(
      jax.random.key(123), 4)]))
  # (the step of the test above: the same shapes, compiled once per session)
  tuned, losses = finetune.finetune(sd, params, start, pools, steps=20, learning_rate=1e-2,
                                    batch_size=4, seed=0, train_text_encoder=False)
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  before, after = evaluate(start), evaluate(tuned)
  assert after < 0.9 * before, (before, after)
  for name in ("down", "up"):  # both factors of every trained layer learn
    moved = [float(np.abs(np.asarray(f[name]) - start["unet"][layer][name]).max())
             for layer, f in tuned["unet"].items()]
    assert min(moved) > 0, name
