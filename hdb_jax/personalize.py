"""One face photo -> a personalized LoRA: hypernetwork, rank relaxation, fast finetuning.

    personalizer = personalize.load(config)       # base, hypernetwork; once per process
    result = personalize.run(personalizer, photo)  # photo [S, S, 3] in [-1, 1]
    images = personalize.sample(personalizer, result.lora, prompts)  # per_prompt each

`config.personalize` (configs/mini.py documents every key): the hypernetwork folder, its
iterations, the relaxed rank r', the finetuning steps, learning rate, batch, whether the
text encoder trains, and the sampling settings. Every jitted function is built once in
`load` and compiled once per process for any photo (`compile` does it ahead of time
and reports how long it took); a persistent compilation cache (`enable_compile_cache`)
makes a new process warm too.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from hdb_jax import diffusion, dreambooth, files, finetune, hypernet, lidb, lora, models
from hdb_jax import params as params_lib

DEFAULT_CACHE = os.path.join("~", ".cache", "hdb-jax", "xla")
# config.personalize.face_check: "dlib" (real photos: hdb_jax/faces.py finds the face and
# cuts an aligned square), "mini_recognizer" (the mini world's synthetic faces), "none".
FACE_CHECKS = ("dlib", "mini_recognizer", "none")


def enable_compile_cache(path: str | None = None) -> str:
  """Persist compiled XLA programs in `path` ($HDB_COMPILE_CACHE, else
  ~/.cache/hdb-jax/xla): the second personalization in a new process skips compiling."""
  path = os.path.expanduser(path or os.environ.get("HDB_COMPILE_CACHE") or DEFAULT_CACHE)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


def photo_size(cfg) -> int:
  """The photo size the configured hypernetwork reads (from its hypernet.json)."""
  import json
  if not cfg.hypernet:
    raise ValueError("config.personalize.hypernet is empty: set it to a hypernetwork folder "
                     "(train.train_hypernet's output), e.g. --set personalize.hypernet=DIR")
  path = os.path.join(cfg.hypernet, hypernet.INFO_FILE)
  try:
    with open(path) as f:
      return int(json.load(f)["image_size"])
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: missing (config.personalize.hypernet is not a "
                            "hypernetwork folder)") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: unreadable hypernetwork info ({e})") from e


def read_photo(path: str, cfg, size: int, crop: bool = True):
  """The face photo at `path` -> (float32 [size, size, 3] in [-1, 1], seconds per stage).

  Read upright (EXIF); with face_check "dlib" the most confident face is found and, with
  `crop`, an aligned square around it is cut (else the centre square is used); with
  "mini_recognizer" the mini world's recognizer must see a face. ValueError naming the
  file for an unreadable or too small image or one without a face."""
  if cfg.face_check not in FACE_CHECKS:
    raise ValueError(f"config.personalize.face_check must be one of {FACE_CHECKS}, "
                     f"got {cfg.face_check!r}")
  tick = time.perf_counter()
  rgb = files.read_rgb(path, min_side=cfg.min_side)
  seconds = {"read": time.perf_counter() - tick}
  tick = time.perf_counter()
  if cfg.face_check == "dlib":
    from hdb_jax import faces  # needs the [faces] extra; only real-photo configs use it
    face = faces.find_face(rgb, path)
    if crop:
      rgb = faces.aligned_crop(rgb, face, size, cfg.crop_margin)
  photo = files.square_resize(rgb, size)
  if cfg.face_check == "mini_recognizer":
    from hdb_jax.mini import recognizer  # the mini world's face check, picked by config
    face_prob = float(recognizer.load()(photo[None])["face_prob"][0])
    if face_prob <= 0.5:
      raise ValueError(f"{path}: no face found (the mini world's recognizer gives "
                       f"face probability {face_prob:.2f})")
  seconds["detect"] = time.perf_counter() - tick
  return photo, seconds


@dataclasses.dataclass
class Personalizer:
  """What `run` needs, loaded and jitted once."""
  sd: object
  frozen: dict
  net_params: dict
  aux: dict
  spec: lidb.LiDBSpec
  fingerprint: str
  hypernet_info: dict
  cfg: object               # config.personalize
  prompt: str               # "a [V] <class>"
  predict: object           # jit(params, images [1, S, S, 3]) -> LiDB train, leaves [1, ...]
  encode: object            # jit(vae params, images) -> latent (mean, std)
  step: object              # finetune.make_step
  generate: object          # jit(frozen, lora, cond, uncond, rng, guidance) -> images


@dataclasses.dataclass
class Result:
  lora: dict                # {component: {layer: {"down" [in, r'], "up" [r', out]}}}
  predicted: dict           # the hypernetwork's LiDB train values
  losses: list[float]
  seconds: dict[str, float]


def load(config) -> Personalizer:
  """The base model and the hypernetwork of `config`, checked to belong together, and
  the jitted functions (not compiled yet: `compile`)."""
  cfg = config.personalize
  sd, frozen = models.load_or_build(config.model)
  net, params, info = hypernet.load(cfg.hypernet)
  net_params, learned_aux = hypernet.split_aux(params, net.layout)
  spec = info["lidb_spec"]
  lidb.check_base(spec, frozen, cfg.hypernet)
  fingerprint = params_lib.fingerprint(frozen, spec.layers)
  if info["base_fingerprint"] != fingerprint:
    raise ValueError(f"{cfg.hypernet}: trained on base {info['base_fingerprint']}, "
                     f"config.model is {fingerprint}")
  if int(info["image_size"]) != sd.image_size:
    raise ValueError(f"{cfg.hypernet}: reads {info['image_size']}px photos, the model "
                     f"makes {sd.image_size}px images")
  iterations = int(cfg.iterations or info["hypernet"]["iterations"])

  def generate(frozen, lora_tree, cond_ids, uncond_ids, rng, guidance_scale):
    return diffusion.generate(sd, lora.merge(frozen, lora_tree), cond_ids, uncond_ids, rng,
                              guidance_scale, cfg.sample_steps)

  return Personalizer(
      sd=sd, frozen=frozen, net_params=net_params,
      aux=learned_aux if learned_aux is not None else lidb.make_aux(spec), spec=spec,
      fingerprint=fingerprint, hypernet_info=info, cfg=cfg,
      prompt=config.instance_prompt.format(token=config.token, class_name=config.class_name),
      predict=jax.jit(lambda p, x: net.apply({"params": p}, x, iterations=iterations)),
      encode=jax.jit(sd.encode_images),
      step=finetune.make_step(sd, finetune.optimizer(cfg.learning_rate), cfg.batch_size),
      generate=jax.jit(generate))


def _pools(p: Personalizer, photo: np.ndarray):
  """The photo (and its mirror image), encoded once by the frozen VAE, as a pool."""
  images = np.stack([photo, photo[:, ::-1]]) if p.cfg.hflip else photo[None]
  mean, std = p.encode(p.frozen["vae"], images)
  return (dreambooth.make_pool({"mean": mean, "std": std}, p.sd.tokenize([p.prompt]), 1.0),)


def compile(p: Personalizer, prompts: list[str]) -> float:
  """Compile every function `run` and `sample(prompts)` use, ahead of time, and keep the
  compiled programs in `p` -> seconds taken (little when the persistent cache has them)."""
  began = time.perf_counter()
  size = p.sd.image_size
  photo = np.zeros((size, size, 3), np.float32)
  p.predict = p.predict.lower(p.net_params, photo[None]).compile()
  images = np.zeros((2 if p.cfg.hflip else 1, size, size, 3), np.float32)
  p.encode = p.encode.lower(p.frozen["vae"], images).compile()
  zero = lidb.init(p.spec, jax.random.key(0))
  if p.cfg.steps:
    start = finetune.initial_lora(zero, p.spec, p.aux, p.cfg.rank)
    trained, fixed = finetune.split(start, p.cfg.train_text_encoder)
    opt_state = finetune.optimizer(p.cfg.learning_rate).init(trained)
    p.step = p.step.lower(trained, opt_state, fixed, p.frozen, _pools(p, photo),
                          jax.random.key(0)).compile()
    shapes = jax.tree_util.tree_map(np.asarray, start)
  else:
    shapes = lora.from_lidb(zero, p.spec, p.aux)
  cond = np.repeat(p.sd.tokenize(prompts), p.cfg.per_prompt, 0)
  p.generate = p.generate.lower(p.frozen, shapes, cond, cond, jax.random.key(0),
                                p.cfg.guidance_scale).compile()
  return time.perf_counter() - began


def run(p: Personalizer, photo: np.ndarray, progress=None) -> Result:
  """photo [S, S, 3] in [-1, 1] -> the personalization (and seconds per stage)."""
  seconds = {}
  began = time.perf_counter()
  predicted = jax.tree_util.tree_map(lambda x: np.asarray(x[0]),
                                     p.predict(p.net_params, photo[None]))
  seconds["predict"] = time.perf_counter() - began
  began = time.perf_counter()
  if p.cfg.steps:
    start = finetune.initial_lora(predicted, p.spec, p.aux, p.cfg.rank)
    tuned, losses = finetune.finetune(
        p.sd, p.frozen, start, _pools(p, photo), steps=p.cfg.steps,
        learning_rate=p.cfg.learning_rate, batch_size=p.cfg.batch_size, seed=p.cfg.seed,
        train_text_encoder=p.cfg.train_text_encoder, progress=progress, step_fn=p.step)
  else:  # hypernetwork only: its rank-1 residual as a LoRA
    tuned, losses = lora.from_lidb(predicted, p.spec, p.aux), []
  tuned = jax.tree_util.tree_map(np.asarray, tuned)
  seconds["finetune"] = time.perf_counter() - began
  return Result(lora=tuned, predicted=predicted, losses=losses, seconds=seconds)


def sample(p: Personalizer, lora_tree, prompts: list[str], seed: int = 0) -> np.ndarray:
  """`per_prompt` samples of each prompt in one batch -> [len(prompts), per_prompt, H, W, 3]."""
  per_prompt = p.cfg.per_prompt
  cond = np.repeat(p.sd.tokenize(prompts), per_prompt, 0)
  uncond = np.repeat(p.sd.tokenize([""]), len(cond), 0)
  images = np.asarray(p.generate(p.frozen, lora_tree, cond, uncond, jax.random.key(seed),
                                 p.cfg.guidance_scale))
  return images.reshape((len(prompts), per_prompt) + images.shape[1:])
