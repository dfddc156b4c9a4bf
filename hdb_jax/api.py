"""The personalization job, one home for every front: `hdb personalize`, `hdb demo` and
Python.

    from hdb_jax import api
    hdb = api.load("configs/mini.py")                          # base, hypernetwork, programs
    me = hdb.personalize("assets/mini_subject/photo_0.png")    # hypernetwork + finetuning
    me.export("me_peft.safetensors", "peft")                   # a PyTorch LoRA ("kohya" too)

`load` reads the config and the face check it names; the programs (`personalize.load`:
stored on disk, compiled in background threads) are loaded on the first photo, or at
once with `ready=True`. One `Pipeline` personalizes any number of photos: one at a time
(`personalize`, `personalize.py`'s programs) or a block at a time (`personalize_many`,
`personalize_block.py`: one batch through every stage). A `Personalization` is the
result in memory: `save` writes the personalization and its samples, `export` a PyTorch
LoRA; `write` and `write_many` publish whole output folders atomically (`hdb
personalize`'s --out).

This module and the entry points (cli.py, demo.py) pick the mini world's face check by
config; the method modules below never import hdb_jax/mini.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time

import numpy as np
from PIL import Image

from hdb_jax import files, lidb as lidb_lib, lora, personalize as personalize_lib

PERSONALIZATION_FILE, SAMPLES_FILE, TIMINGS_FILE = (
    "personalization.safetensors", "samples.png", "timings.json")
EXPORT_FORMATS = ("peft", "kohya")


@dataclasses.dataclass
class Photo:
  """A photo as the job uses it: the crop the hypernetwork reads and where it came from."""
  pixels: np.ndarray        # [S, S, 3] float32 in [-1, 1]: the (face) crop
  name: str                 # the file's name
  sha256: str               # of the file's bytes
  seconds: dict             # read, detect


@dataclasses.dataclass
class Personalization:
  """One photo's result: its LoRA, the samples of the config's prompts, and provenance."""
  lora: dict                # {component: {layer: {"down" [in, r], "up" [r, out]}}} (NumPy)
  photo: Photo
  prompts: list[str]        # the sampled prompts (formatted), one row of `samples` each
  samples: np.ndarray       # [len(prompts), per_prompt, H, W, 3] in [-1, 1]
  metadata: dict            # written into personalization.safetensors
  losses: list              # finetuning loss per step
  seconds: dict             # per stage
  upscale: int = 1          # of samples.png
  together: int = 1         # photos personalized in the same block run (personalize_many)
  # The same personalization inside the LiDB subspace (relax "lidb", or the prediction at
  # steps 0): what `save` writes (on SD1.5 a tenth of the LoRA's bytes). None: a LoRA.
  lidb: lidb_lib.Weights | None = None

  @property
  def stem(self) -> str:
    """The photo's file name without its extension: the name of its exports."""
    return os.path.splitext(self.photo.name)[0] or "photo"

  def samples_grid(self) -> np.ndarray:
    """samples.png's pixels: one labelled row per prompt, the photo first (uint8)."""
    rows = [np.concatenate([self.photo.pixels[None], row]) for row in self.samples]
    return files.labelled_rows(rows, self.prompts, upscale=self.upscale)

  @property
  def weights_format(self) -> str:
    """The format `save_weights` writes: "hdb-lidb" or "hdb-lora"."""
    return lidb_lib.FILE_FORMAT if self.lidb is not None else lora.FILE_FORMAT

  def save_weights(self, path: str) -> str:
    """The personalization's weights file at `path` (atomically), with the metadata: a
    LiDB file of its rank (`lidb`) when it has one, else an hdb-lora file. `lora.read`
    and `hdb export` read both."""
    if self.lidb is None:
      lora.save(path, self.lora, metadata=self.metadata)
    else:
      extra = {k: str(v) for k, v in self.metadata.items() if k != "base_fingerprint"}
      self.lidb.save(path, str(self.metadata.get("base_fingerprint", "")), extra)
    return path

  def save(self, folder: str) -> list[str]:
    """personalization.safetensors (`save_weights`) and samples.png into `folder`
    (created if missing) -> the paths written."""
    os.makedirs(folder, exist_ok=True)
    weights = self.save_weights(os.path.join(folder, PERSONALIZATION_FILE))
    samples = os.path.join(folder, SAMPLES_FILE)
    with files.atomic_path(samples) as tmp:
      Image.fromarray(self.samples_grid()).save(tmp, format="PNG")
    return [weights, samples]

  def export(self, path: str, fmt: str = "peft") -> str:
    """The LoRA as a PyTorch LoRA file (`hdb export`'s): "peft" (diffusers'
    load_lora_weights) or "kohya" (A1111, ComfyUI) -> `path`."""
    from hdb_jax import convert
    provenance = {"hdb_source": self.photo.name, "hdb_source_format": self.weights_format,
                  "hdb_base_fingerprint": self.metadata.get("base_fingerprint", ""),
                  "hdb_token": self.metadata.get("token", ""),
                  "hdb_class_name": self.metadata.get("class_name", "")}
    convert.export(self.lora, path, fmt, provenance)
    return path


def load(config, overrides: dict | None = None, *, cache_dir: str | None = None,
         crop: bool = True, render_batch: int = 0, ready: bool = False,
         allow_download: bool = False) -> "Pipeline":
  """A `Pipeline` for `config`: a config file (with `overrides`, {"personalize.steps":
  20, ...}) or a loaded ConfigDict with a `personalize` section. `cache_dir`: the stored
  programs ($HDB_CACHE or ~/.cache/hdb-jax). `crop`: cut an aligned square around the
  face (face_check "dlib"; else the centre square). `render_batch`: samples per prompt
  of `render` (0: no prompt box). `ready`: load and compile the programs now. The model
  folders may be Hugging Face repo ids in the local cache (`hub`; `allow_download`
  fetches a missing one)."""
  from hdb_jax import config_file, hub
  if isinstance(config, (str, os.PathLike)):
    where = str(config)
    config = config_file.load(where, overrides or {}, allow_download)
  else:
    where = "config"
    hub.resolve_config(config, allow_download)
  if "personalize" not in config:
    raise ValueError(f"{where}: no `personalize` section (configs/mini.py has one)")
  if config.personalize.steps < 0:
    raise ValueError(f"personalize.steps must be >= 0, got {config.personalize.steps}")
  pipeline = Pipeline(config, cache_dir, crop, render_batch)
  if ready:
    pipeline.programs().ready()
  return pipeline


class Pipeline:
  """The base model, the hypernetwork and their programs, loaded once; see `load`."""

  def __init__(self, config, cache_dir: str | None, crop: bool, render_batch: int):
    self.config, self.cfg, self.crop, self.render_batch = (
        config, config.personalize, crop, render_batch)
    words = dict(token=config.token, class_name=config.class_name)
    self.prompts = [prompt.format(**words) for prompt in self.cfg.prompts]
    self.cache = personalize_lib.cache_dirs(cache_dir)
    self.image_size = personalize_lib.photo_size(self.cfg)
    self.face_probability = None
    if self.cfg.face_check == "mini_recognizer":
      from hdb_jax import programs
      from hdb_jax.mini import recognizer  # the mini world's face check, picked by config
      self.face_probability = recognizer.face_check_program(
          self.image_size, store=programs.Store(self.cache["programs"]))
    self._lock = threading.RLock()  # programs() is called under it (tokenize)
    self._programs = None
    self._blocks = {}           # block size -> personalize_block.BlockPersonalizer
    self._predicts = {}         # iterations -> compiled hypernetwork
    self._tokenizer = None

  # -- loading -----------------------------------------------------------------------
  def programs(self) -> personalize_lib.Personalizer:
    """The single-photo programs (loaded on first use, compiling in the background)."""
    with self._lock:
      if self._programs is None:
        self._programs = personalize_lib.load(self.config, self.prompts, self.cache,
                                              render_batch=self.render_batch)
      return self._programs

  def block_programs(self, block: int):
    """The block programs for `block` photos at a time (built and traced once)."""
    from hdb_jax import personalize_block
    with self._lock:
      if block not in self._blocks:
        self._blocks[block] = personalize_block.load(self.config, self.prompts, block)
      return self._blocks[block]

  def _predict_for(self, iterations: int | None):
    """The hypernetwork program for `iterations` (None or the config's: the stored one)."""
    import jax
    p = self.programs()
    trained = int(self.cfg.iterations or p.hypernet_info["hypernet"]["iterations"])
    if not iterations or iterations == trained:
      return None
    if iterations < 1:
      raise ValueError(f"iterations must be >= 1, got {iterations}")
    with self._lock:
      if iterations not in self._predicts:
        from hdb_jax import hypernet
        info = p.hypernet_info
        net = hypernet.make(hypernet.weight_layout(p.spec), personalize_lib.net_config(info),
                            personalize_lib.encoder_of(info))
        self._predicts[iterations] = jax.jit(
            lambda params, x: net.apply({"params": params}, x, iterations=iterations))
      return self._predicts[iterations]

  # -- photos ------------------------------------------------------------------------
  def read_photo(self, path: str) -> Photo:
    """The photo at `path`, checked and cropped as the config says. ValueError naming the
    file: unreadable, truncated, too small, too many pixels (a bomb), no face."""
    pixels, seconds = personalize_lib.read_photo(path, self.cfg, self.image_size,
                                                 crop=self.crop,
                                                 face_probability=self.face_probability)
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    return Photo(pixels=pixels, name=os.path.basename(path), sha256=digest, seconds=seconds)

  def _photo(self, image) -> Photo:
    return image if isinstance(image, Photo) else self.read_photo(os.fspath(image))

  def _metadata(self, photo: Photo, steps: int, fingerprint: str, hypernet_fingerprint: str,
                prompt: str, rank: int, **extra) -> dict:
    return {"source": "hdb personalize", "token": self.config.token,
            "class_name": self.config.class_name, "steps": steps,
            "base_fingerprint": fingerprint, "hypernet_fingerprint": hypernet_fingerprint,
            "prompt": prompt, "rank": rank, "image": photo.name, "image_sha256": photo.sha256,
            **extra}

  # -- the job -----------------------------------------------------------------------
  def personalize(self, image, *, steps: int | None = None, iterations: int | None = None,
                  seed: int | None = None, guidance: float | None = None,
                  progress=None) -> Personalization:
    """One photo (a path or a `Photo`) -> its `Personalization`. `steps`, `iterations`,
    `seed`, `guidance` (sampling): other than the config's, with the same programs
    (another iterations compiles the hypernetwork once more). `progress(iterable)` wraps
    the finetuning loop (tqdm, a demo's bar)."""
    photo = self._photo(image)
    seconds = dict(photo.seconds)
    first_load = self._programs is None
    p = self.programs()
    if first_load:
      seconds.update(p.seconds)
    seed = self.cfg.seed if seed is None else int(seed)
    steps = self.cfg.steps if steps is None else int(steps)
    if steps < 0:
      raise ValueError(f"steps must be >= 0, got {steps}")
    result = personalize_lib.run(p, photo.pixels, progress=progress, steps=steps, seed=seed,
                                 predict=self._predict_for(iterations))
    seconds.update(result.seconds)
    tick = time.perf_counter()
    samples = personalize_lib.sample(p, result.lora, self.prompts, seed, guidance)
    seconds["sample"] = time.perf_counter() - tick
    if first_load:
      seconds["compile"] = p.ready()  # overlapped with the stages above
    rank = self.cfg.rank if self.cfg.steps else p.spec.rank
    return Personalization(
        lora=result.lora, photo=photo, prompts=list(self.prompts), samples=samples,
        metadata=self._metadata(photo, steps, p.fingerprint,
                                p.hypernet_info["fingerprint"], p.prompt, rank),
        losses=result.losses, seconds=seconds, upscale=self.cfg.upscale, lidb=result.lidb)

  def personalize_many(self, images, *, block: int = 8, progress=None,
                       fixed_block: bool = False):
    """Photos (paths or `Photo`s) -> their `Personalization`s, yielded in order, `block`
    at a time through one batch (`personalize_block`; each equals its single-photo run
    up to float reassociation). All photos are read (and refused, naming the file)
    before any work. `progress(count)` is told of each finished block. The block is
    `block` or the number of photos if smaller; `fixed_block`: always `block` (fewer
    photos are padded), so that any number of photos runs the same compiled programs."""
    from hdb_jax import personalize_block
    photos = [self._photo(image) for image in images]
    if not photos:
      return
    block = max(1, block if fixed_block else min(block, len(photos)))
    tick = time.perf_counter()
    p = self.block_programs(block)
    load_seconds = time.perf_counter() - tick
    spec = p.hypernet_info["lidb_spec"]
    for first in range(0, len(photos), block):
      group = photos[first:first + block]
      out = personalize_block.run(p, np.stack([ph.pixels for ph in group]))
      tick = time.perf_counter()
      samples = personalize_block.sample(p, out["lora"], self.prompts, self.cfg.seed)
      out["seconds"]["sample"] = time.perf_counter() - tick
      if first == 0:
        out["seconds"]["load"] = load_seconds
      for g, photo in enumerate(group):
        seconds = dict(photo.seconds)
        if g == 0:  # the block's stages, counted once
          seconds.update(out["seconds"])
        yield Personalization(
            lora=_identity_row(out["lora"], g), photo=photo, prompts=list(self.prompts),
            samples=samples[g],
            metadata=self._metadata(photo, self.cfg.steps, p.fingerprint,
                                    p.hypernet_info["fingerprint"], p.instance_prompt,
                                    self.cfg.rank if self.cfg.steps else spec.rank,
                                    block=block),
            losses=[float(x) for x in out["losses"][:, g]], seconds=seconds,
            upscale=self.cfg.upscale, together=len(group),
            lidb=None if out["lidb"] is None else personalize_lib.lidb_weights(
                _identity_row(out["lidb"], g), spec, p.aux, p.learned_aux))
      if progress:
        progress(len(group))

  def tokenize(self, prompts: list[str]) -> np.ndarray:
    """Any prompts -> token ids [N, L] (the base's CLIP tokenizer; no model code)."""
    with self._lock:
      if self._tokenizer is None:
        from hdb_jax.nn.tokenizer import CLIPTokenizer
        model = self.config.model
        folder = (os.path.join(os.path.expanduser(model.path), "tokenizer")
                  if model.get("path") else model.get("tokenizer_path"))
        self._tokenizer = CLIPTokenizer.from_folder(folder)
      length = len(next(iter(self.programs().tokens.values())))
      return np.asarray(self._tokenizer(list(prompts), max_length=length)["input_ids"],
                        np.int32)

  def render(self, result: Personalization, prompt: str, *, seed: int | None = None,
             guidance: float | None = None) -> np.ndarray:
    """`render_batch` samples of any prompt with `result`'s LoRA -> [N, H, W, 3] in
    [-1, 1]. Use the identifier (config.token, "sks") to ask for the person."""
    if not self.render_batch:
      raise ValueError("render: load with render_batch > 0")
    ids = np.repeat(self.tokenize([prompt]), self.render_batch, 0)
    seed = self.cfg.seed if seed is None else int(seed)
    return personalize_lib.render(self.programs(), result.lora, ids, seed, guidance)


def _identity_row(tree, index: int):
  """Identity `index`'s LoRA (or LiDB values) of a block's (leaves [G, ...] -> [...])."""
  return {c: {layer: {k: v[index] for k, v in f.items()} for layer, f in layers.items()}
          for c, layers in tree.items()}


def _timings(seconds: dict, **extra) -> dict:
  return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, **extra}


def write(out: str, result: Personalization, began: float | None = None,
          programs_stored: bool | None = None) -> list[str]:
  """`out` (a new folder, published whole): personalization.safetensors, samples.png and
  timings.json (seconds per stage; `total` from `began`, a perf_counter)."""
  with files.atomic_dir(out) as tmp:
    result.save(tmp)
    seconds = dict(result.seconds)
    if began is not None:
      seconds["total"] = time.perf_counter() - began
    files.write_json(os.path.join(tmp, TIMINGS_FILE), _timings(
        seconds, steps=int(result.metadata["steps"]), programs_stored=programs_stored,
        final_loss=result.losses[-1] if result.losses else None))
  return [PERSONALIZATION_FILE, SAMPLES_FILE, TIMINGS_FILE]


def write_many(out: str, results, began: float | None = None, block: int = 1,
               steps: int | None = None) -> dict:
  """`personalize_many`'s results -> `out`: a folder per photo (its name without the
  extension: personalization.safetensors, samples.png) and timings.json. Each is written
  into the temporary folder as it comes (nothing piles up in memory); `out` appears when
  every photo is done. -> {"photos", "seconds"}."""
  seconds, count = {}, 0
  with files.atomic_dir(out) as tmp:
    for result in results:
      folder = os.path.join(tmp, result.stem)
      if os.path.exists(folder):
        raise ValueError(f"two photos share the name {result.stem!r} without extension")
      result.save(folder)
      for stage, value in result.seconds.items():
        seconds[stage] = seconds.get(stage, 0.0) + value
      count += 1
    total = time.perf_counter() - began if began is not None else sum(seconds.values())
    seconds["total"] = total
    files.write_json(os.path.join(tmp, TIMINGS_FILE), _timings(
        seconds, photos=count, block=block, steps=steps,
        photos_per_second=round(count / total, 3) if total else None))
  return {"photos": count, "seconds": total}
