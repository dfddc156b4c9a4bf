"""`hdb`: command-line tools of hdb-jax.

    hdb info --config configs/sd15.py      sizes of the model and of its LiDB, as JSON
    hdb export --weights lidb.safetensors --format peft|kohya --out lora.safetensors
                                            a LiDB / hdb-lora file as a PyTorch LoRA
    hdb import --lora lora.safetensors --config configs/sd15.py --out hdb_lora.safetensors
               [--skip-unsupported]         a PyTorch LoRA (PEFT, diffusers, kohya) as an
                                            hdb-lora file
    hdb export-base --config configs/tiny.py --out DIR   (or --model DIR)
                                            the base model as a diffusers PyTorch folder
    hdb predict --hypernet DIR --image face.png --out lidb.safetensors [--iterations 4]
                                            a LiDB file from one photo, hypernetwork only
    hdb personalize --config configs/mini.py --image face.png --out DIR [--steps 40]
                                            one photo -> personalization.safetensors,
                                            samples.png, timings.json (hypernetwork +
                                            rank-relaxed fast finetuning)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import numpy as np
from PIL import Image


def _parse_overrides(pairs: list[str]) -> dict:
  overrides = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"hdb: override {pair!r} is not KEY=VALUE")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  return overrides


def info(args) -> dict:
  """Parameter counts of the base components and of the LiDB residual (jax.eval_shape)."""
  from hdb_jax import config_file, lidb, models
  from hdb_jax import params as params_lib
  config = config_file.load(args.config, _parse_overrides(args.set))
  _, abstract = models.from_config(config.model, tokenizer=None)
  spec = lidb.make_spec(abstract, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  return {
      "config": args.config,
      "lidb_layers": spec.num_layers,
      "lidb_layers_per_component": {c: len(v) for c, v in spec.layers.items()},
      "lidb_trainable_params": spec.num_trainable,
      "lidb_bytes_fp32": 4 * spec.num_trainable,
      "lidb": {"a": spec.a, "b": spec.b, "rank": spec.rank, "seed": spec.seed},
      "base_params": {c: params_lib.count(v) for c, v in abstract.items()},
      "base_params_total": params_lib.count(abstract),
  }


def export(args) -> dict:
  """An hdb-jax LiDB or LoRA file -> a PyTorch LoRA file (PEFT/diffusers or kohya)."""
  import os
  from hdb_jax import convert, lora
  weights, metadata = lora.read(args.weights)
  provenance = {"hdb_source": os.path.basename(args.weights),
                "hdb_source_format": metadata.get("format", ""),
                "hdb_base_fingerprint": metadata.get("base_fingerprint", "")}
  provenance.update({f"hdb_{k}": metadata[k] for k in ("token", "class_name") if k in metadata})
  convert.export(weights, args.out, args.format, provenance)
  return {"out": args.out, "format": args.format,
          "layers": {c: len(v) for c, v in weights.items()},
          "ranks": sorted({r for c in lora.ranks(weights).values() for r in c.values()})}


def _abstract_base(model_cfg) -> dict:
  """Abstract params (jax.eval_shape) of the config's base model. With model.path set the
  architecture is read from that folder's config files; no weights are read either way."""
  import os
  import ml_collections
  from hdb_jax import models
  if model_cfg.get("path"):
    folder = os.path.expanduser(model_cfg.path)
    architecture = {key: model_cfg[key] for key in ("dtype", "compute_dtype", "param_dtype")
                    if key in model_cfg}
    for name, file in (("unet", "unet/config.json"), ("vae", "vae/config.json"),
                       ("text_encoder", "text_encoder/config.json"),
                       ("scheduler", "scheduler/scheduler_config.json")):
      architecture[name] = models._read_json(os.path.join(folder, file))
    model_cfg = ml_collections.ConfigDict(architecture)
  _, abstract = models.from_config(model_cfg, tokenizer=None)
  return abstract


def import_lora(args) -> dict:
  """A PyTorch LoRA file (PEFT, diffusers, diffusers' old attention-processor format, or
  kohya) -> an hdb-lora file, checked against the base model of --config (its model.path
  folder's config files, else the config's own architecture; shapes via jax.eval_shape,
  no weights read). LoRAs on dense layers and 1x1 convolutions (kohya's proj_in /
  proj_out) are imported; those on layers hdb-jax cannot apply (larger convolutions:
  3x3 LoCon / LyCORIS) are refused, listed, or with --skip-unsupported left out (their
  number is printed)."""
  import os
  from hdb_jax import config_file, convert_import, lora
  from hdb_jax import params as params_lib
  config = config_file.load(args.config, _parse_overrides(args.set))
  abstract = _abstract_base(config.model)
  weights, fmt, skipped = convert_import.load(args.lora, abstract, args.skip_unsupported)
  if skipped:
    print(f"hdb import: skipped {len(skipped)} LoRA module(s) on layers hdb-jax cannot apply: "
          + ", ".join(skipped), file=sys.stderr)
  lora.save(args.out, weights, {"source": os.path.basename(args.lora), "source_format": fmt,
                                "base_fingerprint": params_lib.fingerprint(abstract),
                                "skipped_unsupported": len(skipped)})
  return {"out": args.out, "source_format": fmt,
          "layers": {c: len(v) for c, v in weights.items()},
          "ranks": sorted({r for c in lora.ranks(weights).values() for r in c.values()}),
          "skipped_unsupported": list(skipped)}


def export_base(args) -> dict:
  """The base model (--model folder, or built/loaded from --config) -> diffusers PyTorch folder."""
  from hdb_jax import config_file, models, torch_export
  if args.model:
    sd, params = models.load(args.model)
  else:
    config = config_file.load(args.config, _parse_overrides(args.set))
    sd, params = models.load_or_build(config.model)
  torch_export.export_base(sd, params, args.out)
  return {"out": args.out}


def predict(args) -> dict:
  """One face photo -> a LiDB file by the hypernetwork alone (no finetuning). The file
  loads like any LiDB file (`lidb.load`, `hdb export`); its metadata names the
  hypernetwork and the iterations."""
  from hdb_jax import hypernet
  return hypernet.predict_file(args.hypernet, args.image, args.out, args.iterations)


PERSONALIZATION_FILE, SAMPLES_FILE, TIMINGS_FILE = (
    "personalization.safetensors", "samples.png", "timings.json")


def personalize(args) -> dict:
  """One face photo -> a personalized model in --out: personalization.safetensors (an
  hdb-lora file: `hdb export` makes it a PyTorch LoRA), samples.png (the photo beside
  samples of each prompt, rows labelled) and timings.json (seconds per stage). The
  hypernetwork predicts LiDB weights, they are relaxed to a rank-r' LoRA and finetuned on
  the photo for `personalize.steps` steps (--steps 0: the hypernetwork alone). Compiled
  programs are stored on disk (--cache-dir), so a second run in a new process neither
  traces nor compiles them."""
  import os
  import time
  from tqdm import tqdm
  from hdb_jax import config_file, files, personalize as personalize_lib
  began = time.perf_counter()
  config = config_file.load(args.config, _parse_overrides(args.set))
  if "personalize" not in config:
    raise ValueError(f"{args.config}: no `personalize` section (configs/mini.py has one)")
  cfg = config.personalize
  if args.steps is not None:
    if args.steps < 0:
      raise ValueError(f"--steps must be >= 0, got {args.steps}")
    cfg.steps = args.steps
  if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
    raise ValueError(f"{args.out}: exists and is not empty (--overwrite replaces it)")
  cache = personalize_lib.cache_dirs(args.cache_dir)

  words = dict(token=config.token, class_name=config.class_name)
  prompts = [prompt.format(**words) for prompt in cfg.prompts]
  size = personalize_lib.photo_size(cfg)
  face_probability = None
  if cfg.face_check == "mini_recognizer":
    from hdb_jax import programs
    from hdb_jax.mini import recognizer  # the mini world's face check, picked by config
    face_probability = recognizer.face_check_program(
        size, store=programs.Store(cache["programs"]))
  if os.path.isdir(args.image):
    return _personalize_folder(args, config, prompts, size, face_probability, began)
  photo, seconds = personalize_lib.read_photo(args.image, cfg, size, crop=not args.no_crop,
                                              face_probability=face_probability)
  photo_hash = _sha256(args.image)
  # The programs compile in background threads: the photo is predicted and the finetuning
  # runs while the sampler is still compiling.
  personalizer = personalize_lib.load(config, prompts, cache)
  seconds.update(personalizer.seconds)
  result = personalize_lib.run(personalizer, photo, progress=lambda steps: tqdm(
      steps, desc="fast finetuning", unit="step", leave=False))
  seconds.update(result.seconds)
  tick = time.perf_counter()
  samples = personalize_lib.sample(personalizer, result.lora, prompts, cfg.seed)
  seconds["sample"] = time.perf_counter() - tick
  seconds["compile"] = personalizer.ready()  # overlapped with the stages above

  with files.atomic_dir(args.out) as tmp:
    _write_personalization(tmp, config, result.lora, photo, samples, prompts, {
        "base_fingerprint": personalizer.fingerprint,
        "hypernet_fingerprint": personalizer.hypernet_info["fingerprint"],
        "prompt": personalizer.prompt,
        "rank": cfg.rank if cfg.steps else personalizer.spec.rank,
        "image": os.path.basename(args.image), "image_sha256": photo_hash})
    seconds["total"] = time.perf_counter() - began
    files.write_json(os.path.join(tmp, TIMINGS_FILE), {
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "steps": cfg.steps, "programs_stored": personalizer.stored,
        "final_loss": result.losses[-1] if result.losses else None})
  return {"out": args.out, "steps": cfg.steps, "seconds": round(seconds["total"], 2),
          "files": [PERSONALIZATION_FILE, SAMPLES_FILE, TIMINGS_FILE]}


def _sha256(path: str) -> str:
  import hashlib
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _write_personalization(folder, config, lora_tree, photo, samples, prompts, metadata):
  """personalization.safetensors and samples.png (the photo, then each prompt's row)."""
  import os
  from hdb_jax import files, lora
  lora.save(os.path.join(folder, PERSONALIZATION_FILE), lora_tree, metadata={
      "source": "hdb personalize", "token": config.token, "class_name": config.class_name,
      "steps": config.personalize.steps, **metadata})
  rows = [np.concatenate([photo[None], row]) for row in samples]
  grid = files.labelled_rows(rows, prompts, upscale=config.personalize.upscale)
  Image.fromarray(grid).save(os.path.join(folder, SAMPLES_FILE))


def _personalize_folder(args, config, prompts, size, face_probability, began) -> dict:
  """`--image FOLDER`: every photo, `--block` at a time personalized together
  (hdb_jax/personalize_block.py); --out gets a folder per photo (its name without the
  extension) with its personalization.safetensors and samples.png, and timings.json.
  A photo that is refused stops the command before any work, naming it."""
  import os
  import time
  from tqdm import tqdm
  from hdb_jax import files, personalize as personalize_lib, personalize_block
  cfg = config.personalize
  paths = files.list_images(args.image)
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if len(set(names)) < len(names):
    raise ValueError(f"{args.image}: two photos share a name without extension")
  seconds = {"read": 0.0, "detect": 0.0}
  photos = []
  for path in paths:
    photo, stages = personalize_lib.read_photo(path, cfg, size, crop=not args.no_crop,
                                               face_probability=face_probability)
    photos.append(photo)
    for stage in ("read", "detect"):
      seconds[stage] += stages[stage]
  tick = time.perf_counter()
  block = min(args.block, len(photos))
  p = personalize_block.load(config, prompts, block)
  seconds["load"] = time.perf_counter() - tick
  lidb_rank = p.hypernet_info["lidb_spec"].rank
  bar = tqdm(total=len(photos), desc="personalizing", unit="photo")
  # Each block's files go into the temporary folder as soon as they exist (nothing piles
  # up in memory); the folder is renamed into place only when every photo is done.
  with files.atomic_dir(args.out) as tmp:
    for first in range(0, len(photos), block):
      out = personalize_block.run(p, np.stack(photos[first:first + block]))
      tick = time.perf_counter()
      samples = personalize_block.sample(p, out["lora"], prompts, cfg.seed)
      out["seconds"]["sample"] = time.perf_counter() - tick
      for stage, value in out["seconds"].items():
        seconds[stage] = seconds.get(stage, 0.0) + value
      for g in range(len(samples)):
        index = first + g
        folder = os.path.join(tmp, names[index])
        os.makedirs(folder)
        _write_personalization(folder, config, _identity_row(out["lora"], g), photos[index],
                               samples[g], prompts, {
                                   "base_fingerprint": p.fingerprint,
                                   "hypernet_fingerprint": p.hypernet_info["fingerprint"],
                                   "prompt": p.instance_prompt,
                                   "rank": cfg.rank if cfg.steps else lidb_rank,
                                   "image": os.path.basename(paths[index]),
                                   "image_sha256": _sha256(paths[index]), "block": block})
      bar.update(len(samples))
    bar.close()
    seconds["total"] = time.perf_counter() - began
    files.write_json(os.path.join(tmp, TIMINGS_FILE), {
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "photos": len(photos), "block": block, "steps": cfg.steps,
        "photos_per_second": round(len(photos) / seconds["total"], 3)})
  return {"out": args.out, "photos": len(photos), "block": block,
          "seconds": round(seconds["total"], 2)}


def _identity_row(tree, index: int):
  """Identity `index`'s LoRA of a block's (leaves [G, ...] -> [...])."""
  return {c: {layer: {k: v[index] for k, v in f.items()} for layer, f in layers.items()}
          for c, layers in tree.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="hdb", description="hdb-jax: HyperDreamBooth in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("info", help="model and LiDB sizes as JSON (no weights allocated)",
                          description=info.__doc__)
  p.add_argument("--config", required=True, help="config file, e.g. configs/sd15.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set lidb.a=64 (repeatable)")
  p = commands.add_parser("export", help="an hdb-jax LiDB/LoRA file as a PyTorch LoRA file",
                          description=export.__doc__)
  p.add_argument("--weights", required=True, help="LiDB or hdb-lora .safetensors file")
  p.add_argument("--format", required=True, choices=("peft", "kohya"),
                 help="peft: diffusers load_lora_weights; kohya: A1111 / ComfyUI")
  p.add_argument("--out", required=True, help="output .safetensors file")
  p = commands.add_parser("import", help="a PyTorch LoRA file as an hdb-lora file",
                          description=import_lora.__doc__)
  p.add_argument("--lora", required=True,
                 help="PEFT, diffusers (also the old attention-processor format) or kohya "
                 ".safetensors file")
  p.add_argument("--config", required=True, help="config of the base model, e.g. configs/sd15.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value (repeatable)")
  p.add_argument("--skip-unsupported", action="store_true",
                 help="leave out LoRAs on layers hdb-jax cannot apply (3x3 convolutions "
                 "of LoCon / LyCORIS files) instead of refusing the file; prints how many")
  p.add_argument("--out", required=True, help="output hdb-lora .safetensors file")
  p = commands.add_parser("export-base", help="the base model as a diffusers PyTorch folder",
                          description=export_base.__doc__)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--config", help="config file: its model.path, or random init (tiny)")
  source.add_argument("--model", help="local diffusers-format folder (Flax or PyTorch weights)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value (repeatable)")
  p.add_argument("--out", required=True, help="output folder")
  p = commands.add_parser("predict", help="a LiDB file from one face photo (hypernetwork)",
                          description=predict.__doc__)
  p.add_argument("--hypernet", required=True,
                 help="trained hypernetwork folder (train/train_hypernet.py), e.g. "
                      "assets/mini_hypernet")
  p.add_argument("--image", required=True, help="the face photo")
  p.add_argument("--out", required=True, help="output LiDB .safetensors file")
  p.add_argument("--iterations", type=int, default=None,
                 help="refinement iterations s (default: as trained)")
  p = commands.add_parser("personalize", help="one face photo -> a personalized model "
                          "(hypernetwork + fast finetuning)", description=personalize.__doc__)
  p.add_argument("--config", required=True,
                 help="config with a `personalize` section, e.g. configs/mini.py")
  p.add_argument("--image", required=True,
                 help="the face photo, or a folder of photos (one person each) personalized "
                 "--block at a time, predicted and finetuned together in one batch")
  p.add_argument("--block", type=int, default=8,
                 help="with a folder: photos personalized together in one batch (default 8)")
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--steps", type=int, default=None,
                 help="fast finetuning steps (default: the config's; 0: hypernetwork only)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set personalize.rank=8 (repeatable)")
  p.add_argument("--cache-dir", default=None,
                 help="cache of traced and compiled programs (default $HDB_CACHE or "
                 "~/.cache/hdb-jax); the second run with the same config skips both")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  p.add_argument("--no-crop", action="store_true",
                 help="use the photo's centre square as it is (face_check 'dlib' otherwise "
                 "cuts an aligned square around the face; the face must still be found)")
  args = parser.parse_args(argv)
  file_commands = {"export": export, "import": import_lora, "export-base": export_base,
                   "predict": predict, "personalize": personalize}
  # SIGTERM and Ctrl-C stop a command the same way: the temporary outputs are removed on
  # the way out (files.atomic_dir / atomic_path), so nothing partial is left beside --out.
  from hdb_jax import files
  files.request_stop(None)
  previous_handlers = {sig: signal.signal(sig, _interrupt)
                       for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    if getattr(args, "out", None):  # an unwritable output is reported before any work
      files.check_writable(args.out)
    if args.command == "info":
      print(json.dumps(info(args), indent=2))
    else:
      print(json.dumps(file_commands[args.command](args), indent=2))
  except (OSError, ValueError, FloatingPointError) as e:
    # OSError: unreadable inputs, unwritable outputs, a full disk (outputs are written to
    # temporary files renamed into place, so nothing partial is left).
    print(f"hdb {args.command}: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    print(f"hdb {args.command}: stopped ({e or 'Ctrl-C'}); nothing written", file=sys.stderr)
    return 130
  finally:
    files.request_stop(None)
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
  return 0


def _interrupt(signum, frame):
  """SIGTERM -> KeyboardInterrupt in the main thread, so cleanup runs as for Ctrl-C. The
  stop is also recorded: if the exception is dropped (raised inside a GC callback), the
  atomic renames still refuse to publish anything."""
  del frame
  from hdb_jax import files
  files.request_stop(f"signal {signal.Signals(signum).name}")
  raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def console_main() -> None:
  """The `hdb` program: `main`, then exit without tearing the interpreter down. Every
  output is complete and renamed into place by then; Python's teardown of JAX's runtime
  (freeing compiled programs and device buffers one object at a time) adds ~1 s to a
  command whose whole point is taking seconds."""
  import logging
  import os
  code = main()
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  console_main()
