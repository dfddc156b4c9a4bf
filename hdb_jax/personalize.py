"""One face photo -> a personalized LoRA: hypernetwork, rank relaxation, fast finetuning.

    personalizer = personalize.load(config, prompts)  # base, hypernetwork, programs
    result = personalize.run(personalizer, photo)     # photo [S, S, 3] in [-1, 1]
    images = personalize.sample(personalizer, result.lora, prompts)  # per_prompt each

`config.personalize` (configs/mini.py documents every key): the hypernetwork folder, its
iterations, the relaxed rank r', the finetuning steps, learning rate, batch, whether the
text encoder trains, and the sampling settings.

Speed: `load` builds five programs (predict, start: relax + optimizer state, encode,
step, generate), compiled once per process for any photo. They are also stored on disk
(`hdb_jax/programs.py`: `jax.export` under a key of everything that shapes them, and
XLA's persistent cache), so a new process with the same config, base folder (Flax
weights) and code neither imports nor traces the model code: it reads the arrays,
deserializes the programs and fetches their compiled code. Otherwise (first run, another
config, a PyTorch-weights or random-init base) the models are built and traced, and the
programs stored for next time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import numpy as np

from hdb_jax import files, finetune, hypernet, lidb, lora, model_folder, prior, programs
from hdb_jax import weights_dataset
from hdb_jax import params as params_lib

DEFAULT_CACHE = os.path.join("~", ".cache", "hdb-jax")
# config.personalize.face_check: "dlib" (real photos: hdb_jax/faces.py finds the face and
# cuts an aligned square), "mini_recognizer" (the mini world's synthetic faces), "none".
FACE_CHECKS = ("dlib", "mini_recognizer", "none")
PROGRAMS = ("predict", "start", "encode", "step", "generate")


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


def _program_key(config, info, prompts: list[str], render_batch: int = 0) -> str:
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


def _stored_frozen(config, bundle: programs.Bundle):
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


def _trace(config, cfg, spec, aux, net_params, info, prompts, exported_one=None,
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
  export("predict", lambda p, x: net.apply({"params": p}, x, iterations=iterations),
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
    pool = dreambooth.make_pool({"mean": np.zeros(mean.shape, mean.dtype),
                                 "std": np.zeros(std.shape, std.dtype)},
                                np.asarray([tokens[instance]]), 1.0)
    pools = (pool,)
    if prior.enabled(cfg):
      class_shape = (int(cfg.prior_images),) + mean.shape[1:]
      pools += (dreambooth.make_pool(
          {"mean": np.zeros(class_shape, mean.dtype), "std": np.zeros(class_shape, std.dtype)},
          np.asarray([tokens[prior.prompt_of(cfg, config.token, config.class_name)]]),
          float(cfg.get("prior_weight", 1.0))),)
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
  aux = learned_aux if learned_aux is not None else stored_aux(spec, cache)
  # The optimizer state's named tuples cross the program files (the same types for any
  # params tree): registered before any program is read or written.
  leaf = {"x": jax.ShapeDtypeStruct((1,), np.float32)}
  programs.register_namedtuples(jax.eval_shape(finetune.optimizer_of(cfg).init,
                                               {"unet": leaf, "text_encoder": leaf}))
  store = programs.Store(cache["programs"]) if cache else None
  key = _program_key(config, info, prompts, render_batch)
  bundle = store.load(key) if store else None
  frozen = _stored_frozen(config, bundle) if bundle else None
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
    exported, meta, frozen = _trace(
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
  fingerprint = check_pair(spec, frozen, info, cfg.hypernet, int(meta["image_size"]))
  return Personalizer(
      frozen=frozen, net_params=net_params, aux=aux, spec=spec, fingerprint=fingerprint,
      hypernet_info=info, cfg=cfg, prompt=meta["instance_prompt"],
      image_size=int(meta["image_size"]), tokens=meta["tokens"],
      predict=compiled["predict"], start=compiled["start"], encode=compiled["encode"],
      step=compiled.get("step"), generate=compiled["generate"], render=compiled.get("render"),
      seconds={"load": loaded - began}, stored=stored, compile_began=compile_began,
      generate_rows=len(prompts) * cfg.per_prompt, prior_prompt=meta.get("prior_prompt"),
      prior_folder=cache.get("prior") if cache else None)


def num_views(cfg) -> int:
  """Training views of the photo: itself, its mirror image (`hflip`) and `augment_crops`
  random crops of each (`dreambooth.subject_views`)."""
  return (2 if cfg.hflip else 1) * (1 + int(cfg.get("augment_crops", 0)))


def _pools(p: Personalizer, photo: np.ndarray):
  """The photo's training views (`num_views`), encoded once by the frozen VAE, as a pool."""
  from hdb_jax import dreambooth
  images = dreambooth.subject_views(np.asarray(photo, np.float32), p.cfg.hflip,
                                    int(p.cfg.get("augment_crops", 0)),
                                    float(p.cfg.get("augment_min_crop", 0.85)), p.cfg.seed)
  mean, std = p.encode(p.frozen["vae"], images)
  pools = (dreambooth.make_pool({"mean": mean, "std": std}, np.asarray([p.tokens[p.prompt]]),
                                1.0),)
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
        int(p.cfg.prior_images), p.generate_rows, num_views(p.cfg), int(p.cfg.seed),
        float(p.cfg.guidance_scale))
    latents = prior.cached_latents(p.prior_folder,
                                   prior.key_of(p.fingerprint, p.cfg, class_ids, p.image_size),
                                   make)
    p.prior_pool = dreambooth.make_pool(latents, np.asarray([class_ids]),
                                        float(p.cfg.get("prior_weight", 1.0)))
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
    tuned, losses = finetune.train(p.step, trained, opt_state, fixed, p.frozen,
                                   _pools(p, photo), steps=steps, seed=seed,
                                   progress=progress)
  else:
    tuned, losses = p.start(batched, p.aux), []
  tuned = jax.tree_util.tree_map(np.asarray, tuned)
  seconds["finetune"] = time.perf_counter() - began
  return Result(lora=tuned, predicted=predicted, losses=losses, seconds=seconds)


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
