"""The fast finetuning recipe's switches (hdb_jax/finetune.py, dreambooth.subject_views,
hdb_jax/prior.py): the relaxation inside the LiDB subspace starts from the prediction's
exact residual and trains only the small factors; the rate's warmup and schedule and the
text encoder's scale do what they say; the photo's crops are crops of it; the prior
term's class images are made once per base and read back after."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hdb_jax import dreambooth, finetune, lidb, lora


def recipe(**overrides):
  cfg = dict(rank=4, steps=10, learning_rate=1e-2, train_text_encoder=True, relax="lora",
             warmup_steps=0, schedule="constant", text_encoder_lr_scale=1.0, up_lr_scale=1.0)
  return ml_collections.ConfigDict({**cfg, **overrides})


def prediction(spec, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(keys[1], x.shape),
                                lidb.init(spec, keys[0]))


def test_lidb_relaxation_keeps_the_residual_and_trains_only_the_small_factors(tiny_lidb):
  spec, aux = tiny_lidb
  predicted = prediction(spec)
  trained, fixed = finetune.start_of(predicted, aux, recipe(relax="lidb", rank=4,
                                                            train_text_encoder=False))
  assert set(trained) == {"unet"} and set(fixed) == {"text_encoder", finetune.AUX}
  for layers in trained.values():
    for layer, w in layers.items():
      a, b = predicted["unet"][layer]["D_train"].shape[0], predicted["unet"][layer]["U_train"].shape[1]
      assert w["D_train"].shape == (a, 4) and w["U_train"].shape == (4, b)
  # The whole LoRA has the prediction's residual exactly, as the rank-4 LoRA start does.
  whole = finetune.lora_of(trained, fixed)
  want = lidb.deltas(predicted, aux)
  for component, residuals in lora.deltas(whole).items():
    for layer, residual in residuals.items():
      np.testing.assert_allclose(residual, want[component][layer], atol=1e-5)
  assert lora.ranks(whole)["unet"] == {layer: 4 for layer in trained["unet"]}
  # ~rank x (a + b) values a layer, where the LoRA has rank x (in + out)
  lidb_values = sum(x.size for x in jax.tree_util.tree_leaves(trained))
  lora_values = sum(x.size for x in jax.tree_util.tree_leaves(
      finetune.start_of(predicted, aux, recipe(train_text_encoder=False))[0]))
  assert lidb_values < lora_values
  with pytest.raises(ValueError, match="relax must be one of"):
    finetune.start_of(predicted, aux, recipe(relax="dense"))


def test_a_finetuning_inside_the_subspace_saves_as_a_lidb_file_of_its_rank(tiny_lidb,
                                                                          tmp_path):
  """finetune.lidb_of -> personalize.lidb_weights -> a LiDB file of rank r' that reads
  back (lora.read, what `hdb export` converts) as the state's whole LoRA (the bytes it
  saves are tested on the mini world's sizes: here a and b clamp to the tiny layers)."""
  from hdb_jax import personalize
  spec, aux = tiny_lidb
  trained, fixed = finetune.start_of(prediction(spec), aux, recipe(relax="lidb", rank=4,
                                                                   train_text_encoder=False))
  trained = jax.tree_util.tree_map(lambda x: x + 0.01, trained)  # as if trained
  compact = personalize.lidb_weights(jax.tree_util.tree_map(
      np.asarray, finetune.lidb_of(trained, fixed)), spec, aux, learned_aux=False)
  assert compact.spec.rank == 4 and compact.aux is None
  assert set(compact.train) == {"unet", "text_encoder"}  # the frozen component kept too
  compact.save(str(tmp_path / "lidb.safetensors"), "f" * 16, {"steps": "10"})
  read, metadata = lora.read(str(tmp_path / "lidb.safetensors"))
  assert metadata["rank"] == "4" and metadata["steps"] == "10"
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         read, jax.tree_util.tree_map(np.asarray,
                                                      finetune.lora_of(trained, fixed)))
  # A LoRA relaxation has no LiDB form.
  assert finetune.lidb_of(*finetune.start_of(prediction(spec), aux, recipe())) is None


def test_prediction_scale_scales_every_residual(tiny_lidb):
  spec, aux = tiny_lidb
  predicted = prediction(spec)
  doubled = lidb.scale_residuals(predicted, 2.0)
  want, got = lidb.deltas(predicted, aux), lidb.deltas(doubled, aux)
  for component, residuals in want.items():
    for layer, residual in residuals.items():
      np.testing.assert_allclose(got[component][layer], 2 * np.asarray(residual), rtol=1e-5,
                                 atol=1e-7)


def test_learning_rate_schedules():
  assert finetune.learning_rate_schedule(recipe()) == 1e-2  # constant: a plain float
  warm = finetune.learning_rate_schedule(recipe(warmup_steps=4))
  np.testing.assert_allclose([warm(0), warm(2), warm(4), warm(9)], [0, 5e-3, 1e-2, 1e-2])
  cosine = finetune.learning_rate_schedule(recipe(schedule="cosine"))
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [1e-2, 5e-3, 0], atol=1e-9)
  both = finetune.learning_rate_schedule(recipe(schedule="cosine", warmup_steps=2))
  assert float(both(0)) == 0 and float(both(2)) == pytest.approx(1e-2)
  assert float(both(10)) == pytest.approx(0, abs=1e-9)
  with pytest.raises(ValueError, match="schedule must be one of"):
    finetune.learning_rate_schedule(recipe(schedule="linear"))


def test_rate_scales_scale_only_their_leaves():
  params = {"unet": {"l": {"down": jnp.ones((3, 2)), "up": jnp.ones((2, 3))}},
            "text_encoder": {"t": {"down": jnp.ones((3, 2)), "up": jnp.ones((2, 3))}}}
  grads = jax.tree_util.tree_map(lambda x: 0.3 * x, params)

  def first_update(cfg):
    tx = finetune.optimizer_of(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates
  plain, scaled = first_update(recipe()), first_update(recipe(text_encoder_lr_scale=0.25))
  np.testing.assert_allclose(scaled["unet"]["l"]["down"], plain["unet"]["l"]["down"])
  np.testing.assert_allclose(scaled["text_encoder"]["t"]["down"],
                             0.25 * np.asarray(plain["text_encoder"]["t"]["down"]), rtol=1e-6)
  # LoRA+'s ratio: the second factor ("up"; "U_train" inside the LiDB subspace) only,
  # multiplied by the text encoder's scale on its layers.
  both = first_update(recipe(up_lr_scale=4.0, text_encoder_lr_scale=0.25))
  for component, scale in (("unet", 1.0), ("text_encoder", 0.25)):
    layer = "l" if component == "unet" else "t"
    np.testing.assert_allclose(both[component][layer]["down"],
                               scale * np.asarray(plain[component][layer]["down"]), rtol=1e-6)
    np.testing.assert_allclose(both[component][layer]["up"],
                               4 * scale * np.asarray(plain[component][layer]["up"]), rtol=1e-6)
  lidb_tree = {"unet": {"l": {"D_train": jnp.ones((3, 2)), "U_train": jnp.ones((2, 3))}}}
  tx = finetune.optimizer_of(recipe(up_lr_scale=4.0))
  lidb_updates, _ = tx.update(jax.tree_util.tree_map(lambda x: 0.3 * x, lidb_tree),
                              tx.init(lidb_tree), lidb_tree)
  np.testing.assert_allclose(lidb_updates["unet"]["l"]["U_train"],
                             4 * np.asarray(lidb_updates["unet"]["l"]["D_train"]).T, rtol=1e-6)
  # Any tree initializes (personalize.load registers the state's types on a 2-level one).
  jax.eval_shape(tx.init, {"unet": {"x": jnp.ones(1)}, "text_encoder": {"x": jnp.ones(1)}})
  # The default recipe is Adam exactly (optax.adamw with weight decay 0).
  default = finetune.optimizer_of(recipe())
  np.testing.assert_allclose(default.update(grads, default.init(params), params)[0]["unet"]["l"]["down"],
                             optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params))[0]["unet"]["l"]["down"])


def test_subject_views_are_the_photo_its_mirror_and_crops_of_each():
  photo = np.random.default_rng(0).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  views = dreambooth.subject_views(photo, hflip=True)
  np.testing.assert_array_equal(views, np.stack([photo, photo[:, ::-1]]))
  cropped = dreambooth.subject_views(photo, hflip=True, crops=2, min_crop=0.75, seed=1)
  assert cropped.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(cropped[0], photo)
  np.testing.assert_array_equal(cropped[3], photo[:, ::-1])
  for view in (1, 2, 4, 5):  # zoomed in: other pixels, the same range
    assert not np.allclose(cropped[view], cropped[0 if view < 3 else 3])
    assert cropped[view].min() >= -1.2 and cropped[view].max() <= 1.2
  np.testing.assert_array_equal(
      cropped, dreambooth.subject_views(photo, hflip=True, crops=2, min_crop=0.75, seed=1))
  # A crop of the whole photo (min_crop 1) is the photo: PIL's box resampling is exact.
  whole = dreambooth.subject_views(photo, hflip=False, crops=1, min_crop=1.0)
  np.testing.assert_allclose(whole[1], photo, atol=1e-5)


def test_face_weights_count_the_face_of_the_aligned_crop(tiny_model):
  weights = dreambooth.face_weights((8, 8), (0.5, 0.48, 0.34, 0.38), 0.1)
  assert weights.shape == (8, 8) and set(np.unique(weights)) == {np.float32(0.1), 1.0}
  assert weights[4, 4] == 1.0 and weights[0, 0] == weights[7, 7] == np.float32(0.1)
  np.testing.assert_array_equal(weights, weights[:, ::-1])  # the mirror view's too
  cfg = recipe(background_weight=1.0, face_ellipse=(0.5, 0.48, 0.34, 0.38))
  from hdb_jax import personalize_programs
  assert personalize_programs.pixel_weights(cfg, (8, 8)) is None  # 1: the plain loss
  cfg.background_weight = 1.5
  with pytest.raises(ValueError, match="background_weight must be in"):
    personalize_programs.pixel_weights(cfg, (8, 8))
  # In the loss: weights of 1 everywhere are the plain loss; the face's weights are not.
  sd, params = tiny_model
  grid = (sd.latent_size, sd.latent_size)
  latents = jax.random.normal(jax.random.key(1), (2, sd.latent_channels) + grid)
  subject = {"mean": latents, "std": jnp.full_like(latents, 0.1)}
  ids = sd.tokenize(["a sks face"])
  loss = lambda pool: float(dreambooth.pools_loss(sd, params, (pool,), jax.random.key(2), 4))
  plain = loss(dreambooth.make_pool(subject, ids, 1.0))
  np.testing.assert_allclose(loss(dreambooth.make_pool(subject, ids, 1.0, np.ones(grid))), plain,
                             rtol=1e-5)
  face = dreambooth.face_weights(grid, (0.5, 0.5, 0.3, 0.3), 0.0)
  assert abs(loss(dreambooth.make_pool(subject, ids, 1.0, face)) - plain) > 1e-4 * plain


@pytest.mark.slow  # compiles the mini personalization's programs with a prior pool
def test_prior_term_class_images_are_made_once_per_base_and_cached(tmp_path):
  import os
  from hdb_jax import config_file, personalize, prior
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_file.load(os.path.join(repo, "configs", "mini.py"), {
      "personalize.steps": 2, "personalize.prior_images": 3, "personalize.prior_weight": 0.5,
      "personalize.per_prompt": 1, "personalize.sample_steps": 2, "personalize.rank": 4})
  cache = personalize.cache_dirs(str(tmp_path))
  prompt = config.instance_prompt.format(token=config.token, class_name=config.class_name)
  photo = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
  p = personalize.load(config, [prompt], cache)
  first = personalize.run(p, photo)
  pool = p.prior_pool
  assert pool["mean"].shape[0] == 3 and np.all(np.asarray(pool["weight"]) == 0.5)
  assert p.prior_prompt == "a face" and len(os.listdir(cache["prior"])) == 1
  again = personalize.load(config, [prompt], cache)
  made = []
  original = prior.make_latents
  prior.make_latents = lambda *a, **k: made.append(1) or original(*a, **k)
  try:
    second = personalize.run(again, photo)
  finally:
    prior.make_latents = original
  assert not made  # read from the cache
  np.testing.assert_array_equal(again.prior_pool["mean"], pool["mean"])
  np.testing.assert_allclose(second.losses, first.losses, rtol=1e-6)
