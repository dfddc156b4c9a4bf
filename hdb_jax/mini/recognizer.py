"""Recognizer of the mini world: our stand-in for face recognition and CLIP metrics.

A small CNN (flax.linen) trained on renderer ground truth (hdb_jax/mini/render.py)
predicts, from a 32x32 image in any style: every identity attribute, the background
colour, the rendering style, and whether the image is a face at all. Metrics built on it:

  identity_accuracy  fraction of attributes matching a reference identity  ("Face Rec")
  context_accuracy   predicted background / style == the prompt's          ("CLIP-T")
  face_validity      predicted face probability > 0.5
  diversity          number of distinct predicted attribute tuples

    rec = recognizer.load()                 # committed weights, assets/recognizer/
    pred = rec(images)                      # uint8 or [-1, 1], [N, 32, 32, 3]
    recognizer.evaluate(rec, images, prompts=["a sketch of a face", ...])

Training: train/train_recognizer.py (configs/recognizer.py).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from hdb_jax import files, params as params_lib
from hdb_jax.mini import render

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = os.path.join(REPO, "assets", "recognizer")
WEIGHTS_FILE, INFO_FILE = "recognizer.safetensors", "recognizer.json"

# Heads: every identity attribute, then context, then face / non-face.
HEADS = render.ATTRIBUTES + (("background", render.BACKGROUNDS), ("style", render.STYLES),
                             ("face", ("no", "yes")))
HEAD_NAMES = tuple(name for name, _ in HEADS)
HEAD_SIZES = tuple(len(values) for _, values in HEADS)
CONTEXT_HEADS = ("background", "style")


class RecognizerNet(nn.Module):
  """2x2 space-to-depth (32x32x3 -> 16x16x12, keeps every pixel at a quarter of the conv
  cost), conv stages of 3x3 convs + 2x2 max pool, a dense layer, one linear head each."""
  widths: tuple = ((32, 32), (64, 64), (128,))
  hidden: int = 128

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] float in [-1, 1]
    b, h, w, c = images.shape
    x = images.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    for stage, widths in enumerate(self.widths):
      for i, width in enumerate(widths):
        x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{stage}_{i}")(x))
      if stage < len(self.widths) - 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x.reshape(b, -1)))
    return {name: nn.Dense(size, name=f"head_{name}")(x)  # [B, size]
            for name, size in zip(HEAD_NAMES, HEAD_SIZES)}


def to_float(images) -> jnp.ndarray:
  """uint8 [0, 255] or float [-1, 1] images [N, H, W, 3] -> float32 [-1, 1]."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


# ---------------------------------------------------------------- training data (NumPy)


def non_faces(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
  """Negatives for the face head, uint8 [n, size, size, 3]: smooth noise, colour blobs,
  tile-scrambled faces and featureless heads (a quarter each, shuffled)."""
  kinds = rng.permutation(np.arange(n) % 4)
  out = np.zeros((n, size, size, 3), np.uint8)
  count = [(kinds == k).sum() for k in range(4)]
  if count[0]:  # smooth colour noise at a random scale
    low = rng.integers(2, 9)
    noise = rng.uniform(0, 1, (count[0], low, low, 3)).astype(np.float32)
    out[kinds == 0] = np.round(render.upsample(noise, size) * 255).astype(np.uint8)
  if count[1]:  # colour blobs on a background
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 - 1
    canvas = np.ones((count[1], size, size, 3), np.float32) * rng.uniform(0, 1, (count[1], 1, 1, 3))
    for _ in range(4):
      cx, cy = rng.uniform(-0.7, 0.7, (2, count[1], 1, 1))
      rx, ry = rng.uniform(0.1, 0.6, (2, count[1], 1, 1))
      inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
      inside &= rng.uniform(size=(count[1], 1, 1)) < 0.7
      canvas = np.where(inside[..., None], rng.uniform(0, 1, (count[1], 1, 1, 3)), canvas)
    out[kinds == 1] = np.round(canvas * 255).astype(np.uint8)
  if count[2]:  # faces cut into 4x4 tiles, shuffled
    faces = random_faces(rng, count[2], size=size)["images"]
    t = size // 4
    tiles = faces.reshape(count[2], 4, t, 4, t, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
        count[2], 16, t, t, 3)
    order = np.argsort(rng.uniform(size=(count[2], 16)), axis=1)
    tiles = np.take_along_axis(tiles, order[:, :, None, None, None], axis=1)
    out[kinds == 2] = tiles.reshape(count[2], 4, 4, t, t, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
        count[2], size, size, 3)
  if count[3]:  # heads without eyes and mouth
    out[kinds == 3] = random_faces(rng, count[3], size=size, features=False)["images"]
  return out


def random_faces(rng: np.random.Generator, n: int, exclude=None, size: int = 32,
                 features: bool = True) -> dict:
  """n renders of random identities (not in `exclude`, int codes) and random views."""
  codes = rng.integers(render.NUM_IDENTITIES, size=n)
  if exclude is not None and len(exclude):
    bad = np.isin(codes, exclude)
    while bad.any():
      codes[bad] = rng.integers(render.NUM_IDENTITIES, size=int(bad.sum()))
      bad = np.isin(codes, exclude)
  attributes = render.identity_attributes(codes)
  views = render.sample_views(rng.integers(2**63, size=n))
  images = render.render(attributes, views, size=size,
                         features=None if features else np.zeros(n, bool))
  return dict(images=images, attributes=attributes, background=views["background"],
              style=views["style"])


def labelled_batch(faces: dict, negatives: np.ndarray) -> dict:
  """Faces + negatives -> images uint8 [B, H, W, 3], labels int32 [B, heads]; attribute and
  context labels of negatives are -1 (not trained)."""
  n, m = len(faces["images"]), len(negatives)
  labels = np.full((n + m, len(HEADS)), -1, np.int32)
  labels[:n, :render.NUM_ATTRIBUTES] = faces["attributes"]
  labels[:n, HEAD_NAMES.index("background")] = faces["background"]
  labels[:n, HEAD_NAMES.index("style")] = faces["style"]
  labels[:, HEAD_NAMES.index("face")] = np.r_[np.ones(n), np.zeros(m)]
  return dict(images=np.concatenate([faces["images"], negatives]), labels=labels)


def holdout_identities(dataset_config: str = "default") -> np.ndarray:
  """Identity codes of the holdout split of synthetic_faces/`dataset_config` (no TFDS
  build needed): the recognizer never trains on them."""
  from hdb_jax.mini import synthetic_faces  # imports TFDS
  config = next(c for c in synthetic_faces.CONFIGS if c.name == dataset_config)
  return synthetic_faces.split_codes(config)["holdout"]


def holdout_renders(identities, images_per_identity: int = 4, num_negatives: int = 512,
                    seed: int = 1000) -> dict:
  """A fixed labelled evaluation set: `images_per_identity` views of each identity (view
  seeds from `seed`, not the dataset's) + `num_negatives` non-faces. See `labelled_batch`."""
  identities = np.asarray(identities, np.int64)
  attributes = np.repeat(render.identity_attributes(identities), images_per_identity, axis=0)
  views = render.sample_views([render.view_seed(seed, int(i), j) for i in identities
                               for j in range(images_per_identity)])
  faces = dict(images=render.render(attributes, views), attributes=attributes,
               background=views["background"], style=views["style"])
  negatives = non_faces(np.random.default_rng([seed, 0xF]), num_negatives)
  return labelled_batch(faces, negatives)


def head_accuracy(predictions: dict, labels) -> dict:
  """Accuracy of every head on a labelled set (labels int32 [N, heads], -1 = none):
  {head: float}; 'face' counts faces and non-faces."""
  labels = np.asarray(labels)
  out = {}
  for i, name in enumerate(HEAD_NAMES):
    if name == "face":
      predicted = face_validity(predictions).astype(np.int32)
    elif name in predictions:
      predicted = predictions[name]
    else:
      predicted = predictions["attributes"][:, render.ATTRIBUTE_NAMES.index(name)]
    known = labels[:, i] >= 0
    out[name] = float((predicted[known] == labels[known, i]).mean()) if known.any() else float("nan")
  return out


# ---------------------------------------------------------------- training (JAX)


def augment(key, images):
  """What a small diffusion model does to a picture: blur, noise, colour shifts; plus
  horizontal flips (every attribute is left-right symmetric). [B, H, W, 3] in [-1, 1]."""
  b = images.shape[0]
  k_flip, k_blur, k_noise, k_gain, k_shift, k_amount = jax.random.split(key, 6)
  flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  # Blur: a per-image mix of the image and its 3x3 box average (a cheap Gaussian).
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  box = sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
  blur = jax.random.uniform(k_blur, (b, 1, 1, 1)) * jax.random.bernoulli(k_amount, 0.6, (b, 1, 1, 1))
  images = images + blur * (box - images)
  gain = 1.0 + jax.random.uniform(k_gain, (b, 1, 1, 3), minval=-0.06, maxval=0.06)
  shift = jax.random.uniform(k_shift, (b, 1, 1, 3), minval=-0.06, maxval=0.06)
  sigma = jax.random.uniform(jax.random.fold_in(k_noise, 1), (b, 1, 1, 1), maxval=0.08)
  noise = sigma * jax.random.normal(k_noise, images.shape)
  return jnp.clip(images * gain + shift + noise, -1.0, 1.0)


def loss_fn(model, params, images, labels):
  """Sum over heads of the mean cross-entropy over labelled examples (label >= 0)."""
  logits = model.apply({"params": params}, images)
  total, accuracy = 0.0, {}
  for i, name in enumerate(HEAD_NAMES):
    label = labels[:, i]
    mask = (label >= 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], jnp.maximum(label, 0))
    total = total + jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0)
    hit = (jnp.argmax(logits[name], -1) == label).astype(jnp.float32)
    accuracy[name] = jnp.sum(hit * mask) / jnp.maximum(mask.sum(), 1.0)
  return total, accuracy


def make_train_step(model, optimizer):
  """Jitted (params, opt_state, images uint8, labels, key) -> (params, opt_state, loss, acc)."""
  @jax.jit
  def step(params, opt_state, images, labels, key):
    images = augment(key, to_float(images))
    (loss, accuracy), grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, images, labels), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy
  return step


def init(model, seed: int = 0, size: int = 32):
  return model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]


# ---------------------------------------------------------------- inference and metrics


def make_predict(model, chunk: int = 256):
  """(params, images uint8 or [-1, 1] [N, H, W, 3]) -> predictions (NumPy):
  attributes int32 [N, A], background int32 [N], style int32 [N], face_prob float32 [N].
  Runs in fixed-size chunks (one compile for any N)."""
  @jax.jit
  def chunk_fn(params, images):
    logits = model.apply({"params": params}, to_float(images))
    attributes = jnp.stack([jnp.argmax(logits[name], -1) for name in render.ATTRIBUTE_NAMES], -1)
    return dict(attributes=attributes.astype(jnp.int32),
                background=jnp.argmax(logits["background"], -1).astype(jnp.int32),
                style=jnp.argmax(logits["style"], -1).astype(jnp.int32),
                face_prob=jax.nn.softmax(logits["face"])[:, 1])

  def predict(params, images) -> dict:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    if images.dtype != np.uint8:
      images = images.astype(np.float32)
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % chunk,) + images.shape[1:], images.dtype)])
    parts = [jax.device_get(chunk_fn(params, padded[i:i + chunk]))
             for i in range(0, len(padded), chunk)]
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]} if parts else {}
  return predict


def identity_accuracy(predictions: dict, reference_attributes) -> np.ndarray:
  """Fraction of attributes matching the reference identity, per image: float [N].
  reference_attributes: int [A] (one identity) or [N, A]."""
  reference = np.broadcast_to(np.asarray(reference_attributes), predictions["attributes"].shape)
  return (predictions["attributes"] == reference).mean(axis=-1)


def context_targets(prompts) -> dict:
  """Prompts -> background, style int32 [N] (-1 where the prompt leaves it open)."""
  parsed = np.array([render.parse_caption(p) for p in prompts], np.int32).reshape(-1, 2)
  return dict(background=parsed[:, 0], style=parsed[:, 1])


def context_accuracy(predictions: dict, background=None, style=None) -> dict:
  """Per image, predicted context == target: {'background', 'style'} -> float [N]
  (1 hit, 0 miss, NaN where the target is -1 / not given)."""
  out = {}
  for name, target in (("background", background), ("style", style)):
    if target is None:
      continue
    target = np.broadcast_to(np.asarray(target), predictions[name].shape)
    out[name] = np.where(target >= 0, (predictions[name] == target).astype(np.float32), np.nan)
  return out


def face_validity(predictions: dict, threshold: float = 0.5) -> np.ndarray:
  """Per image: is it a face? bool [N]."""
  return predictions["face_prob"] > threshold


def diversity(predictions: dict, valid=None) -> int:
  """Number of distinct predicted identity-attribute tuples (among `valid` images)."""
  attributes = predictions["attributes"]
  if valid is not None:
    attributes = attributes[np.asarray(valid, bool)]
  return len({tuple(a) for a in attributes.tolist()})


def evaluate(recognizer, images, prompts=None, reference_attributes=None) -> dict:
  """Summary metrics of generated `images` (uint8 or [-1, 1]) -> dict of floats:
  face_validity, diversity, and when given identity_accuracy (vs the reference identity)
  and background_accuracy / style_accuracy (vs the prompts, over prompts that name it)."""
  pred = recognizer(images)
  valid = face_validity(pred)
  out = dict(num_images=len(valid), face_validity=float(valid.mean()),
             diversity=diversity(pred, valid))
  if reference_attributes is not None:
    out["identity_accuracy"] = float(identity_accuracy(pred, reference_attributes).mean())
  if prompts is not None:
    for name, hits in context_accuracy(pred, **context_targets(prompts)).items():
      named = ~np.isnan(hits)
      out[f"{name}_accuracy"] = float(hits[named].mean()) if named.any() else float("nan")
  return out


# ---------------------------------------------------------------- weights


def save(path: str, params, info: dict) -> None:
  """Write `path`/recognizer.safetensors (float32) + recognizer.json (info), atomically."""
  flat = {k: np.asarray(v, np.float32) for k, v in params_lib.flatten(params).items()}
  os.makedirs(path, exist_ok=True)
  with files.atomic_path(os.path.join(path, WEIGHTS_FILE)) as tmp:
    save_file(flat, tmp, metadata={"format": "hdb_jax.recognizer"})
  with files.atomic_path(os.path.join(path, INFO_FILE)) as tmp, open(tmp, "w") as f:
    json.dump(info, f, indent=2)


class Recognizer:
  """Loaded recognizer: `rec(images) -> predictions` (see `make_predict`); `rec.params`,
  `rec.model`, `rec.info` (architecture, training and held-out accuracy)."""

  def __init__(self, model, params, info: dict):
    self.model, self.params, self.info = model, params, info
    self._predict = make_predict(model)

  def __call__(self, images) -> dict:
    return self._predict(self.params, images)


def load(path: str = DEFAULT_PATH) -> Recognizer:
  """The recognizer in `path` (default: the committed weights in assets/recognizer)."""
  weights, info_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INFO_FILE)
  for needed in (weights, info_path):
    if not os.path.isfile(needed):
      raise FileNotFoundError(f"{needed}: missing (train one with "
                              "python -m train.train_recognizer --config configs/recognizer.py)")
  with open(info_path) as f:
    info = json.load(f)
  model = RecognizerNet(widths=tuple(tuple(w) for w in info["model"]["widths"]),
                        hidden=info["model"]["hidden"])
  try:
    params = params_lib.unflatten({k: jnp.asarray(v) for k, v in load_file(weights).items()})
  except Exception as e:
    raise ValueError(f"{weights}: cannot read recognizer weights ({e})") from e
  expected = jax.eval_shape(lambda: init(model))
  if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(params):
    raise ValueError(f"{weights}: parameters do not match the architecture in {info_path}")
  return Recognizer(model, params, info)


def face_check_program(image_size: int, path: str = DEFAULT_PATH, store=None):
  """-> photo [S, S, 3] in [-1, 1] -> the face head's probability, for one photo.

  With a `programs.Store` (`hdb personalize`'s cache) the program is exported on the
  first run and read back after, so a new process neither builds nor traces the model:
  only its weights are read (the key covers them, the architecture and the code)."""
  import hashlib
  from hdb_jax import programs
  digest = hashlib.sha256()
  for name in (WEIGHTS_FILE, INFO_FILE):
    try:
      with open(os.path.join(path, name), "rb") as f:
        digest.update(f.read())
    except FileNotFoundError:
      load(path)  # raises, naming the missing file and how to make it
      raise
  key = programs.key_of("mini_recognizer.face_prob", digest.hexdigest(), image_size)
  bundle = store.load(key) if store else None
  if bundle is None:
    recognizer = load(path)
    photo = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(
        lambda params, images: jax.nn.softmax(
            recognizer.model.apply({"params": params}, images)["face"])[:, 1]))(
                recognizer.params, photo)
    params = recognizer.params
    if store:
      try:
        store.save(key, {"face_prob": exported}, {})
      except OSError:
        pass  # traced again next time
  else:
    exported = bundle.programs["face_prob"]
    params = params_lib.unflatten(load_file(os.path.join(path, WEIGHTS_FILE)))
  face_prob = programs.compiled(exported)
  return lambda photo: float(face_prob(params, np.asarray(photo, np.float32)[None])[0])
