"""The programs of a personalization (`hdb_jax/personalize.py`): traced from the model
code, or rebuilt around the stored ones without it.

`trace` builds the base and the hypernetwork and exports, in the order they run, the
five programs (predict, start: relax + optimizer state, encode, step, generate; with
`render_batch`, a sixth: the sampler for any prompt); `program_key` names everything that
shapes them, so `programs.Store` can keep them. `stored_frozen` reads the base's arrays
as the stored programs take them, `stored_aux` the aux matrices made once: together they
let a new process skip the model code (`personalize.load`).
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

from hdb_jax import files, finetune, hypernet, lidb, lora, model_folder, prior, programs
from hdb_jax import weights_dataset
from hdb_jax import params as params_lib

PROGRAMS = ("predict", "start", "encode", "step", "generate")


def num_views(cfg) -> int:
  """Training views of the photo: itself, its mirror image (`hflip`) and `augment_crops`
  random crops of each (`dreambooth.subject_views`)."""
  return (2 if cfg.hflip else 1) * (1 + int(cfg.get("augment_crops", 0)))


def pixel_weights(cfg, grid: tuple[int, int]):
  """The instance pool's per-position loss weights [h, w] on the latent grid: with
  `background_weight` < 1, the face ellipse of an aligned crop (`face_ellipse`) at 1 and
  the rest at that weight (`dreambooth.face_weights`); None (the plain loss) at 1."""
  weight = float(cfg.get("background_weight", 1.0))
  if weight == 1.0:
    return None
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"config.personalize.background_weight must be in [0, 1], got {weight}")
  from hdb_jax import dreambooth
  return dreambooth.face_weights(grid, cfg.face_ellipse, weight)


def predict_scaled(net, net_params, photos, iterations: int, cfg):
  """The hypernetwork's LiDB weights for photos [G, S, S, 3], each residual times
  `prediction_scale` (1: as predicted; > 1 goes on in the direction it predicts, as more
  iterations do)."""
  predicted = net.apply({"params": net_params}, photos, iterations=iterations)
  factor = float(cfg.get("prediction_scale", 1.0))
  return predicted if factor == 1.0 else lidb.scale_residuals(predicted, factor)


def program_key(config, info, prompts: list[str], render_batch: int = 0) -> str:
  """Everything that shapes the programs (weights are arguments, so not them)."""
  model = config.model.to_dict()
  folder_configs = model_folder.read_config_texts(model["path"]) if model.get("path") else {}
  tokenizer = {}
  for name in ("vocab.json", "merges.txt"):
    for root in (model.get("path") and os.path.join(model["path"], "tokenizer"),
                 model.get("tokenizer_path")):
      if root and os.path.exists(os.path.join(root, name)):
        with open(os.path.join(root, name), "rb") as f:
          tokenizer[name] = hashlib.sha256(f.read()).hexdigest()
  cfg = {k: v for k, v in config.personalize.to_dict().items() if k != "hypernet"}
  return programs.key_of(
      "personalize", model, folder_configs, tokenizer, cfg, config.instance_prompt,
      config.token, config.class_name, list(prompts), info["hypernet"],
      weights_dataset.spec_to_json(info["lidb_spec"]), info.get("image_size"),
      *([render_batch] if render_batch else []))


def check_pair(spec, frozen, info, where: str, image_size: int) -> str:
  """The base and the hypernetwork belong together -> the base's fingerprint."""
  lidb.check_base(spec, frozen, where)
  fingerprint = params_lib.fingerprint(frozen, spec.layers)
  if info["base_fingerprint"] != fingerprint:
    raise ValueError(f"{where}: trained on base {info['base_fingerprint']}, "
                     f"config.model is {fingerprint}")
  if int(info["image_size"]) != image_size:
    raise ValueError(f"{where}: reads {info['image_size']}px photos, the model "
                     f"makes {image_size}px images")
  return fingerprint


def stored_aux(spec: lidb.LiDBSpec, cache: dict | None) -> dict:
  """`lidb.make_aux(spec)`, kept in the programs folder of `cache` after the first time:
  making them runs a JAX draw per layer shape, ~0.3 s of a new process."""
  if not cache:
    return lidb.make_aux(spec)
  key = programs.key_of("aux", weights_dataset.spec_to_json(spec))
  path = os.path.join(cache["programs"], f"aux-{key}.npz")
  try:
    with np.load(path) as stored:
      flat = {name: stored[name] for name in stored.files}
    return {c: {layer: {n: flat["|".join((c, layer, n))] for n in ("D_aux", "U_aux")}
                for layer in layers} for c, layers in spec.layers.items()}
  except (OSError, ValueError, KeyError):
    pass
  aux = lidb.make_aux(spec)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **{"|".join((c, layer, n)): m for c, layers in aux.items()
                   for layer, matrices in layers.items() for n, m in matrices.items()})
  return aux


def stored_frozen(config, bundle: programs.Bundle):
  """The base's arrays read straight from its Flax files, cast as the stored programs
  take them; None when that is not possible (then the models are built)."""
  path = config.model.get("path")
  if not path:
    return None
  try:
    frozen = model_folder.read_flax_params(os.path.expanduser(path))
  except Exception:  # a damaged file: models.load names it
    return None
  if frozen is None:
    return None
  (frozen_avals, *_), _ = jax.tree_util.tree_unflatten(bundle.programs["generate"].in_tree,
                                                       bundle.programs["generate"].in_avals)
  try:
    return jax.tree_util.tree_map(
        lambda aval, x: np.asarray(x, aval.dtype) if np.shape(x) == aval.shape else None,
        frozen_avals, frozen)
  except ValueError:  # another tree structure
    return None


def trace(config, cfg, spec, aux, net_params, info, prompts, exported_one=None,
           render_batch: int = 0):
  """Build the models and export the five programs -> (exported, meta, frozen), in the
  order they run; `exported_one(name, program)` is told of each as soon as it exists."""
  from hdb_jax import diffusion, dreambooth, models  # the model code: first runs only
  sd, frozen = models.load_or_build(config.model)
  instance = config.instance_prompt.format(token=config.token, class_name=config.class_name)
  texts = [instance, ""] + list(prompts)
  if prior.enabled(cfg):
    texts.append(prior.prompt_of(cfg, config.token, config.class_name))
  tokens = dict(zip(texts, sd.tokenize(texts).tolist()))
  net = hypernet.make(hypernet.weight_layout(spec), net_config(info), encoder_of(info))
  iterations = int(cfg.iterations or info["hypernet"]["iterations"])
  tx = finetune.optimizer_of(cfg)

  def start(predicted, aux):
    predicted = jax.tree_util.tree_map(lambda x: x[0], predicted)
    if not cfg.steps:  # hypernetwork only: its rank-1 residual as a LoRA
      return lora.lidb_factors(predicted, aux)
    trained, fixed = finetune.start_of(predicted, aux, cfg)
    return trained, fixed, tx.init(trained)

  def generate(frozen, lora_tree, cond_ids, uncond_ids, rng, guidance_scale):
    return diffusion.generate(sd, lora.merge(frozen, lora_tree), cond_ids, uncond_ids, rng,
                              guidance_scale, cfg.sample_steps)

  exported = {}

  def export(name, fn, *args, jitted=False):
    exported[name] = jax.export.export(fn if jitted else jax.jit(fn))(*args)
    if exported_one:
      exported_one(name, exported[name])
    return exported[name]

  size = sd.image_size
  views = num_views(cfg)
  export("predict", lambda p, x: predict_scaled(net, p, x, iterations, cfg),
         net_params, np.zeros((1, size, size, 3), np.float32))
  predicted = jax.eval_shape(exported["predict"].call, net_params,
                             jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  export("start", start, predicted, aux)
  export("encode", sd.encode_images, frozen["vae"],
         np.zeros((views, size, size, 3), np.float32))
  started = jax.eval_shape(exported["start"].call, predicted, aux)
  if cfg.steps:
    trained, fixed, opt_state = started
    mean, std = jax.eval_shape(exported["encode"].call, frozen["vae"],
                               jax.ShapeDtypeStruct((views, size, size, 3), np.float32))
    weights = pixel_weights(cfg, mean.shape[-2:])
    pool = dreambooth.make_pool({"mean": np.zeros(mean.shape, mean.dtype),
                                 "std": np.zeros(std.shape, std.dtype)},
                                np.asarray([tokens[instance]]), 1.0, weights)
    pools = (pool,)
    if prior.enabled(cfg):
      class_shape = (int(cfg.prior_images),) + mean.shape[1:]
      pools += (dreambooth.make_pool(
          {"mean": np.zeros(class_shape, mean.dtype), "std": np.zeros(class_shape, std.dtype)},
          np.asarray([tokens[prior.prompt_of(cfg, config.token, config.class_name)]]),
          float(cfg.get("prior_weight", 1.0)),
          None if weights is None else np.ones_like(weights)),)
    step = finetune.make_step(sd, tx, cfg.batch_size)
    export("step", step, trained, opt_state, fixed, frozen, pools, jax.random.key(0),
           jitted=True)
    lora_shapes = jax.eval_shape(finetune.lora_of, trained, fixed)
  else:
    lora_shapes = started
  cond = np.zeros((len(prompts) * cfg.per_prompt, sd.max_length), np.int32)
  export("generate", generate, frozen, lora_shapes, cond, cond, jax.random.key(0),
         np.float32(cfg.guidance_scale))
  if render_batch:  # any prompt, `render_batch` samples (hdb demo's prompt box)
    cond = np.zeros((render_batch, sd.max_length), np.int32)
    export("render", generate, frozen, lora_shapes, cond, cond, jax.random.key(0),
           np.float32(cfg.guidance_scale))
  meta = {"tokens": tokens, "image_size": size, "instance_prompt": instance,
          "prior_prompt": texts[-1] if prior.enabled(cfg) else None}
  return exported, meta, frozen


def net_config(info):
  import ml_collections
  return ml_collections.ConfigDict(info["hypernet"])


def encoder_of(info):
  """The CLIP vision tower of a hypernetwork that has one (its architecture is stored)."""
  encoder = info["hypernet"].get("encoder", {})
  if encoder.get("kind", "vit") != "clip":
    return None
  from hdb_jax import models
  return models.vision_encoder_from_config(info["encoder_config"],
                                           encoder.get("dtype", "float32"))
