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
    hdb demo [--config configs/mini.py] [--host 127.0.0.1] [--port 7860]
                                            the same in a web page (Gradio, [demo] extra)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  """Parameter counts of the base components and of the LiDB residual (jax.eval_shape),
  and the bytes per rank of a personalization on the LiDB's layers: inside the LiDB
  subspace (rank x (a + b) values a layer: what personalization.safetensors holds with
  relax "lidb") and as a LoRA (rank x (in + out): relax "lora", and the exports)."""
  from hdb_jax import config_file, lidb, models
  from hdb_jax import params as params_lib
  config = config_file.load(args.config, _parse_overrides(args.set), args.allow_download)
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
      "bytes_fp32_per_rank": {
          "lidb_subspace": 4 * spec.num_trainable // spec.rank,
          "lora": 4 * sum(i + o for ls in spec.layers.values() for i, o in ls.values())},
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
  config = config_file.load(args.config, _parse_overrides(args.set), args.allow_download)
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
    config = config_file.load(args.config, _parse_overrides(args.set), args.allow_download)
    sd, params = models.load_or_build(config.model)
  torch_export.export_base(sd, params, args.out)
  return {"out": args.out}


def predict(args) -> dict:
  """One face photo -> a LiDB file by the hypernetwork alone (no finetuning). The file
  loads like any LiDB file (`lidb.load`, `hdb export`); its metadata names the
  hypernetwork, the iterations and the scale."""
  from hdb_jax import hub, hypernet
  folder = hub.resolve(args.hypernet, "--hypernet", args.allow_download)
  return hypernet.predict_file(folder, args.image, args.out, args.iterations, args.scale)


from hdb_jax.api import PERSONALIZATION_FILE, SAMPLES_FILE, TIMINGS_FILE  # noqa: E402


def personalize(args) -> dict:
  """One face photo -> a personalized model in --out: personalization.safetensors (a LiDB
  file of rank r' when the relaxation stays in the LiDB subspace, configs/mini.py's
  default, or of rank 1 with --steps 0; an hdb-lora file for relax "lora": `hdb export`
  makes either a PyTorch LoRA), samples.png (the photo beside
  samples of each prompt, rows labelled) and timings.json (seconds per stage). The
  hypernetwork predicts LiDB weights, they are relaxed to rank r' and finetuned on
  the photo for `personalize.steps` steps (--steps 0: the hypernetwork alone). Compiled
  programs are stored on disk (--cache-dir), so a second run in a new process neither
  traces nor compiles them. The job itself is hdb_jax/api.py's."""
  import os
  import time
  from tqdm import tqdm
  from hdb_jax import api, config_file
  began = time.perf_counter()
  config = config_file.load(args.config, _parse_overrides(args.set), args.allow_download)
  if args.steps is not None:
    if args.steps < 0:
      raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if "personalize" in config:
      config.personalize.steps = args.steps
  if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
    raise ValueError(f"{args.out}: exists and is not empty (--overwrite replaces it)")
  if "personalize" not in config:
    raise ValueError(f"{args.config}: no `personalize` section (configs/mini.py has one)")
  hdb = api.load(config, cache_dir=args.cache_dir, crop=not args.no_crop)
  if os.path.isdir(args.image):
    return _personalize_folder(args, hdb, began)
  photo = hdb.read_photo(args.image)  # a refused photo stops the command before any work
  # The programs compile in background threads: the photo is predicted and the finetuning
  # runs while the sampler is still compiling.
  result = hdb.personalize(photo, progress=lambda steps: tqdm(
      steps, desc="fast finetuning", unit="step", leave=False))
  written = api.write(args.out, result, began, programs_stored=hdb.programs().stored)
  return {"out": args.out, "steps": config.personalize.steps,
          "seconds": round(time.perf_counter() - began, 2), "files": written}


def _personalize_folder(args, hdb, began) -> dict:
  """`--image FOLDER`: every photo, `--block` at a time personalized together
  (hdb_jax/personalize_block.py); --out gets a folder per photo (its name without the
  extension) with its personalization.safetensors and samples.png, and timings.json.
  A photo that is refused stops the command before any work, naming it."""
  import os
  from tqdm import tqdm
  from hdb_jax import api, files
  paths = files.list_images(args.image)
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if len(set(names)) < len(names):
    raise ValueError(f"{args.image}: two photos share a name without extension")
  photos = [hdb.read_photo(path) for path in paths]
  block = min(args.block, len(photos))
  bar = tqdm(total=len(photos), desc="personalizing", unit="photo")
  done = api.write_many(args.out, hdb.personalize_many(photos, block=block,
                                                      progress=bar.update),
                        began, block=block, steps=hdb.cfg.steps)
  bar.close()
  return {"out": args.out, "photos": done["photos"], "block": block,
          "seconds": round(done["seconds"], 2)}


def demo(args) -> dict:
  """The web page (Gradio; pip install -e '.[demo]'): upload a face photo or pick the
  example, see the crop it will use, personalize it with a progress bar, look at the
  samples, render your own prompts and download the personalization and its PyTorch
  LoRAs (PEFT/diffusers, kohya). Binds 127.0.0.1 unless --host says otherwise; --share
  (a public gradio.live link) is off unless asked for. The programs are loaded (from
  the cache when stored) before the page is served. Ctrl-C stops it."""
  import time
  from hdb_jax import config_file
  try:
    from hdb_jax import demo_page
    import gradio  # noqa: F401
  except ImportError as e:
    raise ValueError(f"hdb demo needs the [demo] extra: pip install -e '.[demo]' ({e})") from e
  config = config_file.load(args.config, _parse_overrides(args.set), args.allow_download)
  if "personalize" not in config:
    raise ValueError(f"{args.config}: no `personalize` section (configs/mini.py has one)")
  began = time.perf_counter()
  _, startup = demo_page.serve(
      config, host=args.host, port=args.port, share=args.share, cache_dir=args.cache_dir,
      crop=not args.no_crop, batch=args.batch, max_upload_mb=args.max_upload_mb,
      example=args.example)
  return {"served_seconds": round(time.perf_counter() - began, 1),
          "startup_seconds": round(startup, 2)}


def _config_flags(argv: list[str]) -> list[str]:
  """`--config.model.path=X` (ml_collections' flag style, as train/ takes it) -> `--set
  model.path=X`, so both spellings work."""
  out, items = [], list(argv)
  while items:
    item = items.pop(0)
    if item.startswith("--config."):
      key, sep, value = item[len("--config."):].partition("=")
      if not sep:
        if not items:
          raise SystemExit(f"hdb: {item} needs a value")
        value = items.pop(0)
      out += ["--set", f"{key}={value}"]
    else:
      out.append(item)
  return out


def main(argv=None) -> int:
  argv = _config_flags(sys.argv[1:] if argv is None else argv)
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
  p.add_argument("--scale", type=float, default=1.0,
                 help="multiply every predicted residual by this (default 1: as trained; "
                      "1.5 on the mini world's network: more identity, context within a "
                      "point, docs/results.md)")
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
  p = commands.add_parser("demo", help="the web page: a photo in, samples and LoRAs out "
                          "(Gradio)", description=demo.__doc__)
  p.add_argument("--config", default=os.path.join(REPO, "configs", "mini.py"),
                 help="config with a `personalize` section (default: configs/mini.py)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set model.path=DIR (repeatable; "
                 "--config.model.path=DIR works too)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
  p.add_argument("--share", action="store_true",
                 help="also serve through a public gradio.live link (off by default)")
  p.add_argument("--cache-dir", default=None, help="cache of stored programs (as personalize)")
  p.add_argument("--batch", type=int, default=1,
                 help="personalize up to this many waiting requests as one block "
                 "(faster on accelerators; default 1: one at a time, docs/demo.md)")
  p.add_argument("--max-upload-mb", type=float, default=10.0,
                 help="uploads above this size are refused before decoding (default 10)")
  p.add_argument("--no-crop", action="store_true", help="as personalize's --no-crop")
  p.add_argument("--example", default=os.path.join(REPO, "assets", "mini_subject", "photo_0.png"),
                 help="the photo of the page's example button (default: the mini world's "
                 "assets/mini_subject/photo_0.png; give a real face photo for SD1.5)")
  for name, sub in commands.choices.items():
    if name in ("info", "import", "export-base", "predict", "personalize", "demo"):
      sub.add_argument("--allow-download", action="store_true",
                       help="a model given as a Hugging Face repo id (owner/name) that is "
                       "not in the local Hugging Face cache is fetched (off: only the cache "
                       "is read, nothing goes to the network)")
  args = parser.parse_args(argv)
  file_commands = {"export": export, "import": import_lora, "export-base": export_base,
                   "predict": predict, "personalize": personalize, "demo": demo}
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
