"""One face photo -> a personalized LoRA: hypernetwork, rank relaxation, fast finetuning.

    personalizer = personalize.load(config, prompts)  # base, hypernetwork, programs
    result = personalize.run(personalizer, photo)     # photo [S, S, 3] in [-1, 1]
    images = personalize.sample(personalizer, result.lora, prompts)  # per_prompt each

`config.personalize` (configs/mini.py documents every key): the hypernetwork folder, its
iterations, the relaxed rank r', the finetuning steps, learning rate, batch, whether the
text encoder trains, and the sampling settings.

Speed: `load` builds five programs (predict, start: relax + optimizer state, encode,
step, generate; `hdb_jax/personalize_programs.py` traces them), compiled once per
process for any photo. They are also stored on disk (`hdb_jax/programs.py`:
`jax.export` under a key of everything that shapes them, and
XLA's persistent cache), so a new process with the same config, base folder (Flax
weights) and code neither imports nor traces the model code: it reads the arrays,
deserializes the programs and fetches their compiled code. Otherwise (first run, another
config, a PyTorch-weights or random-init base) the models are built and traced, and the
programs stored for next time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from hdb_jax import files, finetune, hypernet, lidb, prior, programs
from hdb_jax import personalize_programs as programs_lib

DEFAULT_CACHE = os.path.join("~", ".cache", "hdb-jax")
# config.personalize.face_check: "dlib" (real photos: hdb_jax/faces.py finds the face and
# cuts an aligned square), "mini_recognizer" (the mini world's synthetic faces), "none".
FACE_CHECKS = ("dlib", "mini_recognizer", "none")


def cache_dirs(path: str | None = None) -> dict[str, str]:
  """The cache folders under `path` ($HDB_CACHE, else ~/.cache/hdb-jax): "xla" (XLA's
  compiled code), "programs" (exported programs) and "prior" (the prior term's class
  latents, `hdb_jax/prior.py`), created; the XLA one is enabled.
  A JAX compilation cache the user set ($JAX_COMPILATION_CACHE_DIR) is kept as "xla"."""
  root = os.path.expanduser(path or os.environ.get("HDB_CACHE") or DEFAULT_CACHE)
  dirs = {"xla": os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(root, "xla"),
          "programs": os.path.join(root, "programs"), "prior": os.path.join(root, "prior")}
  for folder in dirs.values():
    os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", dirs["xla"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return dirs


def photo_size(cfg) -> int:
  """The photo size the configured hypernetwork reads (from its hypernet.json)."""
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


def read_photo(path: str, cfg, size: int, crop: bool = True, face_probability=None):
  """The face photo at `path` -> (float32 [size, size, 3] in [-1, 1], seconds per stage).

  Read upright (EXIF); with face_check "dlib" the most confident face is found and, with
  `crop`, an aligned square around it is cut (else the centre square is used); with
  "mini_recognizer", `face_probability(photo)` (the mini world's recognizer, passed in by
  the entry point) must see a face. ValueError naming the file for an unreadable or too
  small image or one without a face."""
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
    if face_probability is None:
      raise ValueError("face_check 'mini_recognizer' needs the recognizer's face_probability")
    face_prob = float(face_probability(photo))
    if face_prob <= 0.5:
      raise ValueError(f"{path}: no face found (the mini world's recognizer gives "
                       f"face probability {face_prob:.2f})")
  seconds["detect"] = time.perf_counter() - tick
  return photo, seconds


@dataclasses.dataclass
class Personalizer:
  """What `run` and `sample` need: arrays and compiled programs (no model code)."""
  frozen: dict
  net_params: dict
  aux: dict
  spec: lidb.LiDBSpec
  fingerprint: str
  hypernet_info: dict
  cfg: object               # config.personalize
  prompt: str               # "a [V] <class>"
  image_size: int
  tokens: dict              # prompt -> token ids [L]: the instance prompt, "", `prompts`
  predict: object           # (net params, images [1, S, S, 3]) -> LiDB train, leaves [1, ...]
  start: object             # (prediction, aux) -> (trained, fixed, opt state); steps 0: LoRA
  encode: object            # (vae params, images [V, S, S, 3]) -> latent (mean, std)
  step: object              # finetune.make_step's; None when steps == 0
  generate: object          # (frozen, lora, cond [N, L], uncond [N, L], rng, guidance) -> images
  render: object            # generate's for N = `render_batch` rows (None: not loaded)
  seconds: dict             # load
  stored: bool              # the programs came from the store (no tracing)
  compile_began: float      # perf_counter when the programs began compiling
  generate_rows: int = 0           # rows of `generate`: len(prompts) x per_prompt
  prior_prompt: str | None = None  # the prior term's class prompt (prior_images > 0)
  prior_folder: str | None = None  # where the prior term's class latents are cached
  prior_pool: dict | None = None   # made on the first `run` (config.personalize.prior_images)
  learned_aux: bool = False        # the hypernetwork learned its aux matrices (in `aux`)

  def ready(self) -> float:
    """Wait until every program is compiled -> seconds from the start of compiling to the
    last one ready. `load` returns while they compile: the first call of each waits."""
    pending = [self.predict, self.start, self.encode, self.step, self.generate, self.render]
    for program in pending:
      if program is not None:
        program.result()
    return max(p.ready_at for p in pending if p is not None) - self.compile_began


@dataclasses.dataclass
class Result:
  lora: dict                # {component: {layer: {"down" [in, r'], "up" [r', out]}}}
  predicted: dict           # the hypernetwork's LiDB train values
  losses: list[float]
  seconds: dict[str, float]
  # The same personalization as a LiDB (its compact file): the prediction for steps 0,
  # the finetuned rank-r' values for relax "lidb"; None for a LoRA relaxation.
  lidb: lidb.Weights | None = None


def lidb_weights(train, spec: lidb.LiDBSpec, aux, learned_aux: bool) -> lidb.Weights:
  """LiDB train values of any rank with the aux matrices of `spec` -> their `lidb.Weights`
  (the spec at the values' rank; the aux matrices kept only when learned)."""
  first = next(iter(next(iter(train.values())).values()))["D_train"]  # [a, r]
  return lidb.Weights(train, dataclasses.replace(spec, rank=int(first.shape[-1])),
                      aux if learned_aux else None)


def load(config, prompts: list[str], cache: dict | None = None,
         render_batch: int = 0) -> Personalizer:
  """The base model, the hypernetwork (checked to belong together) and the programs,
  compiling in background threads (`Personalizer.ready()` waits for them); `prompts`
  (formatted) are the ones `sample` will get. `cache`: `cache_dirs()` (None: no stored
  programs; XLA's cache as configured). `render_batch` > 0 adds a sixth program, the
  sampler for that many rows of any prompt (`render`)."""
  cfg = config.personalize
  began = time.perf_counter()
  params, info = hypernet.read(cfg.hypernet)
  spec = info["lidb_spec"]
  net_params, learned_aux = hypernet.split_aux(params, hypernet.weight_layout(spec))
  aux = learned_aux if learned_aux is not None else programs_lib.stored_aux(spec, cache)
  # The optimizer state's named tuples cross the program files (the same types for any
  # params tree): registered before any program is read or written.
  leaf = {"x": jax.ShapeDtypeStruct((1,), np.float32)}
  programs.register_namedtuples(jax.eval_shape(finetune.optimizer_of(cfg).init,
                                               {"unet": leaf, "text_encoder": leaf}))
  store = programs.Store(cache["programs"]) if cache else None
  key = programs_lib.program_key(config, info, prompts, render_batch)
  bundle = store.load(key) if store else None
  frozen = programs_lib.stored_frozen(config, bundle) if bundle else None
  donate = {"step": (0, 1)}
  if frozen is not None:
    exported, meta, stored = bundle.programs, bundle.meta, True
    loaded = compile_began = time.perf_counter()
    # In the background: the finetuning step (the longest) on one thread, the others in
    # the order they are needed on the other, so that the photo is predicted while the
    # step compiles and the sampler compiles while the finetuning runs.
    compiled = programs.compile_all(exported, donate=donate,
                                    order=("step", "predict", "start", "encode", "generate",
                                           "render"))
  else:
    # Each program compiles in the background as soon as it is traced, beside the tracing
    # of the next one.
    compiler, compiled = programs.Compiler(), {}
    compile_began = time.perf_counter()
    exported, meta, frozen = programs_lib.trace(
        config, cfg, spec, aux, net_params, info, prompts,
        exported_one=lambda name, program: compiled.__setitem__(
            name, compiler.submit(name, program, donate.get(name, ()))),
        render_batch=render_batch)
    compiler.close()
    loaded = time.perf_counter()
    stored = False
    if store:
      try:
        store.save(key, exported, meta)
      except OSError as e:
        logging.warning("%s: cannot store the programs (%s); the next run traces again",
                        store.folder, e)
  fingerprint = programs_lib.check_pair(spec, frozen, info, cfg.hypernet, int(meta["image_size"]))
  return Personalizer(
      frozen=frozen, net_params=net_params, aux=aux, spec=spec, fingerprint=fingerprint,
      hypernet_info=info, cfg=cfg, prompt=meta["instance_prompt"],
      image_size=int(meta["image_size"]), tokens=meta["tokens"],
      predict=compiled["predict"], start=compiled["start"], encode=compiled["encode"],
      step=compiled.get("step"), generate=compiled["generate"], render=compiled.get("render"),
      seconds={"load": loaded - began}, stored=stored, compile_began=compile_began,
      generate_rows=len(prompts) * cfg.per_prompt, prior_prompt=meta.get("prior_prompt"),
      prior_folder=cache.get("prior") if cache else None, learned_aux=learned_aux is not None)


def _pools(p: Personalizer, photo: np.ndarray):
  """The photo's training views (`num_views`), encoded once by the frozen VAE, as a pool
  (with the face ellipse's loss weights when `background_weight` < 1)."""
  from hdb_jax import dreambooth
  images = dreambooth.subject_views(np.asarray(photo, np.float32), p.cfg.hflip,
                                    int(p.cfg.get("augment_crops", 0)),
                                    float(p.cfg.get("augment_min_crop", 0.85)), p.cfg.seed)
  mean, std = p.encode(p.frozen["vae"], images)
  pools = (dreambooth.make_pool({"mean": mean, "std": std}, np.asarray([p.tokens[p.prompt]]),
                                1.0, programs_lib.pixel_weights(p.cfg, mean.shape[-2:])),)
  return pools + ((prior_pool(p),) if prior.enabled(p.cfg) else ())


def prior_pool(p: Personalizer) -> dict:
  """The prior term's pool (`hdb_jax/prior.py`): `prior_images` class images the base
  made, as VAE latents (cached in `p.prior_folder`), loss weight `prior_weight`. Made on
  the first call, then kept in `p`."""
  if p.prior_pool is None:
    from hdb_jax import dreambooth
    class_ids = p.tokens[p.prior_prompt]
    # A zero LoRA of the personalization's shapes: the base exactly, through its sampler.
    zero_photo = np.zeros((1, p.image_size, p.image_size, 3), np.float32)
    trained, fixed, _ = p.start(jax.tree_util.tree_map(np.zeros_like,
                                                       p.predict(p.net_params, zero_photo)),
                                p.aux)
    zero = jax.tree_util.tree_map(np.zeros_like, finetune.lora_of(trained, fixed))
    make = lambda: prior.make_latents(
        p.generate, p.encode, p.frozen, zero, class_ids, p.tokens[""],
        int(p.cfg.prior_images), p.generate_rows, programs_lib.num_views(p.cfg), int(p.cfg.seed),
        float(p.cfg.guidance_scale))
    latents = prior.cached_latents(p.prior_folder,
                                   prior.key_of(p.fingerprint, p.cfg, class_ids, p.image_size),
                                   make)
    weights = programs_lib.pixel_weights(p.cfg, latents["mean"].shape[-2:])
    p.prior_pool = dreambooth.make_pool(latents, np.asarray([class_ids]),
                                        float(p.cfg.get("prior_weight", 1.0)),
                                        None if weights is None else np.ones_like(weights))
  return p.prior_pool


def run(p: Personalizer, photo: np.ndarray, progress=None, from_zero: bool = False,
        steps: int | None = None, seed: int | None = None, predict=None) -> Result:
  """photo [S, S, 3] in [-1, 1] -> the personalization (and seconds per stage).
  `steps`, `seed`: the finetuning's, other than the config's (same programs; with a
  config of steps > 0, steps 0 keeps the exact rank-r' relaxation of the prediction).
  `predict`: another hypernetwork program (other iterations, `api`'s).
  `from_zero`: no prediction (the "no hypernetwork" ablation, LoRA DreamBooth): the
  prediction is replaced by zeros and finetuning starts from the usual LoRA init
  (`finetune.random_start`: as peft's default, kaiming-uniform `down` [in, r'] from
  `personalize.seed` and the layer's path, zero `up`), made on the host with a fresh
  optimizer state; the stored programs are the same as without it. With steps 0 it is
  the zero residual."""
  seconds = {}
  began = time.perf_counter()
  steps = p.cfg.steps if steps is None else steps
  seed = p.cfg.seed if seed is None else seed
  if steps and not p.cfg.steps:
    raise ValueError(f"{steps} finetuning steps asked of programs loaded for steps 0 "
                     "(load with personalize.steps > 0)")
  batched = (predict or p.predict)(p.net_params, np.asarray(photo, np.float32)[None])
  if from_zero:
    batched = jax.tree_util.tree_map(np.zeros_like, batched)
  predicted = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), batched)
  seconds["predict"] = time.perf_counter() - began
  began = time.perf_counter()
  if p.cfg.steps:
    if from_zero:
      if p.cfg.get("relax", "lora") != "lora":
        raise ValueError("from_zero starts a LoRA (relax 'lora'), not a LiDB relaxation")
      trained, fixed = finetune.split(finetune.random_start(p.aux, p.cfg.rank, seed),
                                      p.cfg.train_text_encoder)
      opt_state = finetune.optimizer_of(p.cfg).init(trained)
    else:
      trained, fixed, opt_state = p.start(batched, p.aux)
    trained, losses = finetune.train(p.step, trained, opt_state, fixed, p.frozen,
                                     _pools(p, photo), steps=steps, seed=seed,
                                     progress=progress)
    tuned, compact = finetune.lora_of(trained, fixed), finetune.lidb_of(trained, fixed)
  else:  # the prediction itself (steps 0 keeps its residual exactly)
    tuned, losses, compact = p.start(batched, p.aux), [], predicted
  tuned = jax.tree_util.tree_map(np.asarray, tuned)
  if compact is not None:
    compact = lidb_weights(jax.tree_util.tree_map(np.asarray, compact), p.spec, p.aux,
                           p.learned_aux)
  seconds["finetune"] = time.perf_counter() - began
  return Result(lora=tuned, predicted=predicted, losses=losses, seconds=seconds,
                lidb=compact)


def sample(p: Personalizer, lora_tree, prompts: list[str], seed: int = 0,
           guidance: float | None = None) -> np.ndarray:
  """`per_prompt` samples of each of `prompts` (those given to `load`) in one batch ->
  [len(prompts), per_prompt, H, W, 3]; `guidance`: the scale (default the config's)."""
  unknown = [prompt for prompt in prompts if prompt not in p.tokens]
  if unknown:
    raise ValueError(f"sample: prompts not given to load: {unknown}")
  cond = np.repeat(np.asarray([p.tokens[prompt] for prompt in prompts], np.int32),
                   p.cfg.per_prompt, 0)
  uncond = np.repeat(np.asarray([p.tokens[""]], np.int32), len(cond), 0)
  guidance = p.cfg.guidance_scale if guidance is None else guidance
  images = np.asarray(p.generate(p.frozen, lora_tree, cond, uncond, jax.random.key(seed),
                                 np.float32(guidance)))
  return images.reshape((len(prompts), p.cfg.per_prompt) + images.shape[1:])


def render(p: Personalizer, lora_tree, token_ids: np.ndarray, seed: int = 0,
           guidance: float | None = None) -> np.ndarray:
  """Samples of any prompt: token ids [N, L] (N = `render_batch` of `load`) -> images
  [N, H, W, 3]."""
  if p.render is None:
    raise ValueError("render: load with render_batch > 0")
  uncond = np.repeat(np.asarray([p.tokens[""]], np.int32), len(token_ids), 0)
  guidance = p.cfg.guidance_scale if guidance is None else guidance
  return np.asarray(p.render(p.frozen, lora_tree, np.asarray(token_ids, np.int32), uncond,
                             jax.random.key(seed), np.float32(guidance)))
