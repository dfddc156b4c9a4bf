"""Recognizer: committed weights on a fixed held-out render set, metrics, training step."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from hdb_jax.mini import recognizer, render


@pytest.fixture(scope="module")
def rec():
  return recognizer.load()


@pytest.fixture(scope="module")
def fixed_set():
  """96 holdout identities x 2 new views + 128 non-faces, fixed seed."""
  identities = recognizer.holdout_identities("default")[:96]
  return recognizer.holdout_renders(identities, images_per_identity=2, num_negatives=128,
                                    seed=2024)


@pytest.fixture(scope="module")
def fixed_predictions(rec, fixed_set):
  return rec(fixed_set["images"])


def test_committed_weights_and_report():
  path = recognizer.DEFAULT_PATH
  assert os.path.getsize(os.path.join(path, recognizer.WEIGHTS_FILE)) < 2 * 2**20
  with open(os.path.join(path, recognizer.INFO_FILE)) as f:
    info = json.load(f)
  accuracy = info["holdout"]["accuracy"]["clean"]
  assert set(accuracy) == set(recognizer.HEAD_NAMES)
  assert min(accuracy.values()) >= 0.95, accuracy


def test_accuracy_on_fixed_renders(fixed_set, fixed_predictions):
  accuracy = recognizer.head_accuracy(fixed_predictions, fixed_set["labels"])
  assert set(accuracy) == set(recognizer.HEAD_NAMES)
  assert min(accuracy.values()) >= 0.93, accuracy


def test_uint8_and_float_inputs_agree(rec, fixed_set, fixed_predictions):
  as_float = fixed_set["images"][:64].astype(np.float32) / 127.5 - 1.0
  pred = rec(as_float)
  for key in ("attributes", "background", "style"):
    np.testing.assert_array_equal(pred[key], fixed_predictions[key][:64])
  with pytest.raises(ValueError, match="images must be"):
    rec(as_float[0])


def test_metrics_on_renders(rec, fixed_set, fixed_predictions):
  labels = fixed_set["labels"]
  faces = labels[:, recognizer.HEAD_NAMES.index("face")] == 1
  truth = labels[faces, :render.NUM_ATTRIBUTES]
  pred = {k: v[faces] for k, v in fixed_predictions.items()}
  own = recognizer.identity_accuracy(pred, truth)
  other = recognizer.identity_accuracy(pred, np.roll(truth, 2, axis=0))  # other identities
  assert own.shape == (len(truth),) and own.mean() > 0.95 and other.mean() < 0.7
  valid = recognizer.face_validity(fixed_predictions)
  assert valid[faces].mean() > 0.95 and valid[~faces].mean() < 0.05
  assert recognizer.diversity(pred) > 80  # 96 identities

  # Context against prompts, through `evaluate`.
  background = labels[faces, recognizer.HEAD_NAMES.index("background")]
  style = labels[faces, recognizer.HEAD_NAMES.index("style")]
  prompts = [render.caption(b, s, True, True) for b, s in zip(background, style)]
  summary = recognizer.evaluate(rec, fixed_set["images"][faces], prompts=prompts,
                                reference_attributes=truth)
  assert summary["background_accuracy"] > 0.95 and summary["style_accuracy"] > 0.95
  assert summary["face_validity"] > 0.95 and summary["identity_accuracy"] > 0.95
  wrong = [render.caption((b + 1) % len(render.BACKGROUNDS), s, True, True)
           for b, s in zip(background, style)]
  assert recognizer.evaluate(rec, fixed_set["images"][faces], prompts=wrong)[
      "background_accuracy"] < 0.1


def test_metric_functions_exact():
  pred = dict(attributes=np.array([[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 0, 1],
                                   [1, 1, 2, 3, 0, 1, 0, 0]], np.int32),
              background=np.array([0, 1, 2], np.int32), style=np.array([0, 0, 3], np.int32),
              face_prob=np.array([0.9, 0.2, 0.6], np.float32))
  reference = np.array([0, 1, 2, 3, 0, 1, 0, 1])
  np.testing.assert_allclose(recognizer.identity_accuracy(pred, reference), [1, 1, 6 / 8])
  targets = recognizer.context_targets(["a face on a blue background", "a face",
                                        "a cartoon of a face"])
  np.testing.assert_array_equal(targets["background"], [0, -1, -1])
  np.testing.assert_array_equal(targets["style"], [0, 0, 3])
  hits = recognizer.context_accuracy(pred, **targets)
  np.testing.assert_array_equal(hits["background"], [1, np.nan, np.nan])
  np.testing.assert_array_equal(hits["style"], [1, 1, 1])
  np.testing.assert_array_equal(recognizer.face_validity(pred), [True, False, True])
  assert recognizer.diversity(pred) == 2
  assert recognizer.diversity(pred, valid=[True, False, False]) == 1


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing"):
    recognizer.load(str(tmp_path))
  with open(os.path.join(recognizer.DEFAULT_PATH, recognizer.INFO_FILE)) as f:
    (tmp_path / recognizer.INFO_FILE).write_text(f.read())
  (tmp_path / recognizer.WEIGHTS_FILE).write_bytes(b"not safetensors")
  with pytest.raises(ValueError, match="cannot read"):
    recognizer.load(str(tmp_path))


def test_train_step_learns_and_negatives_differ():
  """A toy-sized net overfits one batch; non-faces are not renders."""
  rng = np.random.default_rng(0)
  faces = recognizer.random_faces(rng, 24)
  negatives = recognizer.non_faces(rng, 8)
  assert negatives.shape == (8, 32, 32, 3) and negatives.dtype == np.uint8
  batch = recognizer.labelled_batch(faces, negatives)
  assert (batch["labels"][24:, :-1] == -1).all() and (batch["labels"][:24] >= 0).all()
  model = recognizer.RecognizerNet(widths=((8,), (16,)), hidden=32)
  params = recognizer.init(model)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)
  step = recognizer.make_train_step(model, optimizer)
  losses = []
  for i in range(40):
    params, opt_state, loss, _ = step(params, opt_state, batch["images"], batch["labels"],
                                      jax.random.key(i))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_face_check_program_stored_then_read_back_equals_the_recognizer(tmp_path, rec):
  """`hdb personalize`'s face check: exported on the first run, read back (no model
  built) on the next; both give the recognizer's face probability."""
  from hdb_jax import programs
  store = programs.Store(str(tmp_path))
  faces = recognizer.random_faces(np.random.default_rng(0), 2)["images"]
  noise = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  photos = np.asarray(recognizer.to_float(np.concatenate([faces, noise])))
  want = rec(photos)["face_prob"]
  first = recognizer.face_check_program(32, store=store)
  assert len(os.listdir(tmp_path)) == 1
  second = recognizer.face_check_program(32, store=store)
  assert len(os.listdir(tmp_path)) == 1
  for check in (first, second):
    got = np.array([check(photo) for photo in photos])
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert want[:2].min() > 0.5 > want[2:].max()
