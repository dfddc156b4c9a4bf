"""The comparison table's methods and scoring (train/evaluate.py runs them): the held-out
identities and their photos, a scorer per `config.scoring`, and per method kind a trainer
photo [S, S, 3] in [-1, 1] -> ("lora", LoRA) or ("params", changed components)."""

import copy
import math

from absl import app
import jax
import numpy as np
import optax

from hdb_jax import baselines, data, dreambooth, evaluate, finetune, lidb, lora, personalize
from hdb_jax.mini import dataset, render
from hdb_jax.mini import recognizer as recognizer_lib

def score_identity(rec, images, prompts: list[str], class_prompt: str, attributes,
                   seeds: int) -> dict:
  """Scores of one identity's samples images [(P + 1) * S, H, W, 3] (prompt-major: the P
  identifier prompts, then the class prompt; S seeds each) -> one result line."""
  predictions = rec(images)
  chosen = [p for p in list(prompts) + [class_prompt] for _ in range(seeds)]
  identity = recognizer_lib.identity_accuracy(predictions, attributes)
  context = recognizer_lib.context_accuracy(predictions, **recognizer_lib.context_targets(chosen))
  valid = recognizer_lib.face_validity(predictions).astype(np.float32)
  grouped = np.asarray(images, np.float32).reshape((len(prompts) + 1, seeds, -1))
  diversity = (np.abs(grouped[:, :, None] - grouped[:, None, :]).mean(-1).sum((1, 2))
               / max(seeds * (seeds - 1), 1))[:-1]               # [P], pairs of seeds
  n = len(prompts) * seeds
  return {"identity": identity[:n].tolist(),
          "background": [None if math.isnan(x) else float(x) for x in context["background"][:n]],
          "style": [None if math.isnan(x) else float(x) for x in context["style"][:n]],
          "valid": valid[:n].tolist(), "diversity": diversity.tolist(),
          "class_identity": identity[n:].tolist()}


def held_out(cfg, image_size: int):
  """-> (identities [M], photos uint8 [M, S, S, 3]): `cfg.identities` spread evenly, each
  its first photo. `cfg.data.source`: synthetic_faces (the mini world's held-out split) or
  face_folder (your photos in `cfg.data.folder`: one subfolder or photo per identity,
  center-cropped and resized to the model's size)."""
  if cfg.data.source == "face_folder":
    records = data.folder_source(cfg.data.folder, cfg.data.data_dir or None, image_size)
    where = cfg.data.folder
  elif cfg.data.source == "synthetic_faces":
    records = dataset.source(cfg.data.config, cfg.data.split, cfg.data.data_dir or None)
    where = f"synthetic_faces/{cfg.data.config}"
  else:
    raise app.UsageError(f"config.data.source must be 'synthetic_faces' or 'face_folder', "
                         f"got {cfg.data.source!r}")
  ranges = list(data.identity_ranges(records))
  picks = np.linspace(0, len(ranges) - 1, min(cfg.identities, len(ranges))).round().astype(int)
  identities = np.array([ranges[k][0] for k in picks], np.int64)
  photos = np.stack([records[ranges[k][1]]["image"] for k in picks])  # reference photos
  if photos.shape[1] != image_size:
    raise ValueError(f"{where} photos are {photos.shape[1]}px, "
                     f"the model makes {image_size}px images")
  return identities, photos


def make_scorer(config, identities, photos, prompts: list[str], class_prompt: str):
  """score(position, images [(P + 1) * S, H, W, 3] in [-1, 1]) -> that identity's scores,
  by `config.scoring`: "recognizer" (the mini world: its recognizer reads the synthetic
  faces' attributes) or "reference" (real photos: Face Rec, CLIP-I, CLIP-T and DINO
  against the identity's photo; encoders from `config.metrics`)."""
  scoring = config.get("scoring", "recognizer")
  if scoring == "recognizer":
    rec = recognizer_lib.load()
    attributes = render.identity_attributes(identities)
    return lambda k, images: score_identity(rec, images, prompts, class_prompt,
                                            attributes[k], config.seeds)
  if scoring == "reference":
    from hdb_jax import metrics
    cfg = config.metrics
    if not cfg.clip_path or not cfg.dino_path:
      raise app.UsageError("scoring 'reference' needs --config.metrics.clip_path and "
                           "--config.metrics.dino_path (local CLIP and DINO folders)")
    encoders = metrics.load_encoders(cfg.clip_path, cfg.dino_path, cfg.batch_size)
    return lambda k, images: evaluate.reference_scores(encoders, photos[k], images, prompts,
                                                       config.seeds, config.token)
  raise app.UsageError(f"config.scoring must be 'recognizer' or 'reference', got {scoring!r}")


def personalize_method(config, method, cache):
  """A trainer for kind "personalize": photo [S, S, 3] in [-1, 1] -> LoRA (numpy)."""
  config = copy.deepcopy(config)
  from_zero = method.get("from_zero", False)
  for key, value in method.items():
    if key == "instance_prompt":  # the prompt of the photo in finetuning (a config key)
      config.instance_prompt = value
    elif key not in ("kind", "from_zero"):
      config.personalize[key] = value
  prompt = config.instance_prompt.format(token=config.token, class_name=config.class_name)
  config.personalize.per_prompt = 1  # its own sampler is not used here: keep it small
  p = personalize.load(config, [prompt], cache)
  p.ready()  # compiled before the first photo: its time is the personalization's only
  return lambda photo: ("lora", personalize.run(p, photo, from_zero=from_zero).lora)


def prior_pools(config, method, sd, frozen, generate_base) -> list:
  """Class-specific prior preservation: [a pool of `method.prior_images` images the frozen
  base made of the class prompt], or [] when `prior_images` is 0. Made once per method,
  shared by all identities."""
  if not method.get("prior_images", 0):
    return []
  words = dict(token=config.token, class_name=config.class_name)
  class_ids = sd.tokenize([config.class_prompt.format(**words)])
  return [baselines.class_pool(sd, frozen, generate_base, class_ids, method.prior_images,
                               jax.random.key(config.seed + 1), config.guidance_scale,
                               method.get("prior_weight", 1.0))]


def subject_pools(sd, frozen, photo, ids, hflip: bool, prior=()) -> list:
  """[the photo [S, S, 3] (and its mirror image) as a pool with loss weight 1, prompt ids
  [1, L]] + the prior pools."""
  latents = dreambooth.encode_subject(sd, frozen["vae"], photo[None], hflip)
  return [dreambooth.make_pool(latents, ids, 1.0)] + list(prior)


def lidb_dreambooth_method(config, method, sd, frozen, generate_base):
  """A trainer for kind "lidb_dreambooth": LiDB DreamBooth on the one photo (+ mirror),
  with prior preservation when `prior_images` > 0."""
  spec = lidb.make_spec(frozen, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  aux = lidb.make_aux(spec)
  tx = optax.adam(method.learning_rate)
  step = dreambooth.make_train_step(sd, tx, method.batch_size)
  prompt = config.instance_prompt.format(token=config.token, class_name=config.class_name)
  ids = sd.tokenize([prompt])
  prior = prior_pools(config, method, sd, frozen, generate_base)

  def train(photo):
    pools = tuple(subject_pools(sd, frozen, photo, ids, method.hflip, prior))
    weights = lidb.init(spec, jax.random.key(config.seed))
    opt_state = tx.init(weights)
    key = jax.random.key(config.seed)
    for k in range(method.steps):
      weights, opt_state, _ = step(weights, opt_state, frozen, aux, pools,
                                   jax.random.fold_in(key, k))
    return "lora", lora.from_lidb(weights, spec, aux)

  return train


def lora_dreambooth_method(config, method, sd, frozen, generate_base):
  """A trainer for kind "lora_dreambooth": the fast finetuning's LoRA (config.personalize:
  rank, Adam, batch, text encoder) from the usual LoRA init (`finetune.random_start`:
  peft's default, kaiming-uniform `down`, zero `up`, seeded by `personalize.seed`),
  `steps` steps, with prior preservation when `prior_images` > 0. Without it, the same
  as kind "personalize" with `from_zero`."""
  cfg = config.personalize
  spec = lidb.make_spec(frozen, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  start = finetune.random_start(lidb.make_aux(spec), method.get("rank", cfg.rank), cfg.seed)
  learning_rate = method.get("learning_rate", cfg.learning_rate)
  step = finetune.make_step(sd, finetune.optimizer(learning_rate), cfg.batch_size)
  ids = sd.tokenize([config.instance_prompt.format(token=config.token,
                                                   class_name=config.class_name)])
  prior = prior_pools(config, method, sd, frozen, generate_base)

  def train(photo):
    pools = subject_pools(sd, frozen, photo, ids, cfg.hflip, prior)
    tuned, _ = finetune.finetune(sd, frozen, start, pools, steps=method.steps,
                                 learning_rate=learning_rate, batch_size=cfg.batch_size,
                                 seed=cfg.seed, train_text_encoder=cfg.train_text_encoder,
                                 step_fn=step)
    return "lora", tuned

  return train


def dreambooth_method(config, method, sd, frozen, generate_base):
  """A trainer for kind "dreambooth": the whole UNet finetuned (DreamBooth proper, or its
  aggressive variants), with prior preservation when `prior_images` > 0."""
  tx = optax.adam(method.learning_rate)
  step = baselines.make_finetune_step(sd, tx, method.batch_size)
  ids = sd.tokenize([config.instance_prompt.format(token=config.token,
                                                   class_name=config.class_name)])
  prior = prior_pools(config, method, sd, frozen, generate_base)

  def train(photo):
    pools = subject_pools(sd, frozen, photo, ids, method.hflip, prior)
    return "params", baselines.dreambooth_finetune(step, tx, frozen, pools,
                                                   steps=method.steps, seed=config.seed)

  return train


def inversion_method(config, method, sd, frozen):
  """A trainer for kind "textual_inversion": the identifier token's embedding only."""
  tx = optax.adam(method.learning_rate)
  token_id = int(sd.tokenize([config.token])[0][1])  # after the start token
  step = baselines.make_inversion_step(sd, tx, method.batch_size, token_id)
  ids = sd.tokenize([config.instance_prompt.format(token=config.token,
                                                   class_name=config.class_name)])

  def train(photo):
    pools = subject_pools(sd, frozen, photo, ids, method.hflip)
    return "params", baselines.textual_inversion(step, tx, frozen, pools, token_id,
                                                 steps=method.steps, seed=config.seed)

  return train


def instance_draws(config, method) -> int:
  """Photo draws a method trains on (batch x steps; prior draws not counted): the kinds
  that run the fast finetuning (personalize, lora_dreambooth) take config.personalize's
  batch, the others their own."""
  if method.kind == "base":
    return 0
  if method.kind in ("personalize", "lora_dreambooth"):
    steps = method.get("steps", config.personalize.steps)
    return steps * method.get("batch_size", config.personalize.batch_size)
  return method.steps * method.batch_size


def make_trainer(config, name: str, method, sd, frozen, generate_base, cache):
  """The trainer of `method` (config.methods[name]), or None for kind "base"."""
  if method.kind == "base":
    return None
  if method.kind == "personalize":
    return personalize_method(config, method, cache)
  if method.kind == "lidb_dreambooth":
    return lidb_dreambooth_method(config, method, sd, frozen, generate_base)
  if method.kind == "lora_dreambooth":
    return lora_dreambooth_method(config, method, sd, frozen, generate_base)
  if method.kind == "dreambooth":
    return dreambooth_method(config, method, sd, frozen, generate_base)
  if method.kind == "textual_inversion":
    return inversion_method(config, method, sd, frozen)
  raise app.UsageError(f"config.methods.{name}.kind: unknown {method.kind!r}")
