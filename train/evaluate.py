r"""The comparison table: personalize held-out identities with every method, score samples.

    python -m train.evaluate --config configs/evaluate_mini.py --workdir workdir/evaluate

`configs/evaluate_mini.py` documents the methods and settings; `configs/evaluate_sd15.py`
runs SD1.5 on your photos, scored by Face Rec, CLIP-I, CLIP-T and DINO (`config.scoring`,
`make_scorer`). In --workdir:
  results/<method>.jsonl   one line per identity: its seconds and every sample's scores
  summary.json             the table: mean and 95% bootstrap CI over identities per metric
  table.md                 the same for docs (columns by scoring: hdb_jax/evaluate.py SCORINGS)
  samples.png              per method (rows): a few identities' photo, then their samples
Rerunning resumes (per method and chunk of identities); SIGTERM or Ctrl-C stops after the
chunk in hand is saved; --methods runs a subset. Methods
share compiled programs where they can (the personalize ones through hdb personalize's
program store, the sampler for all).
"""

import copy
import math
import os
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np
import optax
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import baselines, checkpoint, diffusion, dreambooth, evaluate, files, finetune
from hdb_jax import lidb, logs
from hdb_jax import lora
from hdb_jax import models, personalize
from hdb_jax.mini import dataset, render
from hdb_jax.mini import recognizer as recognizer_lib
from hdb_jax import data

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWN_IDENTITIES, SHOWN_PROMPTS = 4, (0, 1, 7)  # figure: plain, a background, a style


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Evaluation config (configs/evaluate_*.py).")
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.DEFINE_list("methods", [], "Methods to run (default: all of config.methods).")
  flags.DEFINE_string("cache_dir", None, "Program cache of hdb personalize (default "
                      "$HDB_CACHE or ~/.cache/hdb-jax).")
  flags.mark_flags_as_required(["config", "workdir"])


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
    if key not in ("kind", "from_zero"):
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


def main(argv):
  del argv
  logs.quiet_libraries()
  config, workdir = FLAGS.config, FLAGS.workdir
  results_dir = os.path.join(workdir, "results")
  os.makedirs(results_dir, exist_ok=True)
  os.makedirs(os.path.join(workdir, "shown"), exist_ok=True)
  cache = personalize.cache_dirs(FLAGS.cache_dir)
  sd, frozen = models.load_or_build(config.model)
  identities, photos = held_out(config, sd.image_size)
  words = dict(token=config.token, class_name=config.class_name)
  prompts = [p.format(**words) for p in config.prompts]
  class_prompt = config.class_prompt.format(**words)
  rows = (len(prompts) + 1) * config.seeds                     # samples per identity
  shown_prompts = [p for p in SHOWN_PROMPTS if p < len(prompts)]
  chunk = config.chunk
  cond_one = np.repeat(sd.tokenize(prompts + [class_prompt]), config.seeds, 0)  # [rows, L]
  uncond_one = np.repeat(sd.tokenize([""]), rows, 0)
  cond, uncond = np.tile(cond_one, (chunk, 1)), np.tile(uncond_one, (chunk, 1))
  generate_base = dreambooth.make_generate(sd, config.sample_steps)
  generate = dreambooth.make_generate_per_identity_lora(sd, config.sample_steps)
  # Every sample's starting noise follows (seed, identity position, row) alone: the same
  # for every method, however its samples are batched or resumed.
  seed_key = jax.random.key(config.seed)
  noise_of = jax.jit(lambda position: diffusion.noise_for(sd, jax.vmap(
      lambda row: jax.random.fold_in(jax.random.fold_in(seed_key, position), row))(
          np.arange(rows))))
  score = make_scorer(config, identities, photos, prompts, class_prompt)
  names = list(FLAGS.methods) or list(config.methods)
  unknown = [n for n in names if n not in config.methods]
  if unknown:
    raise app.UsageError(f"--methods: {unknown} not in config.methods "
                         f"({sorted(config.methods)})")

  stop = checkpoint.StopFlag()  # SIGTERM / Ctrl-C: the chunk in hand is finished and saved
  for name in names:
    method = config.methods[name]
    store = evaluate.ResultsFile(results_dir, name)
    todo = [k for k, i in enumerate(identities) if int(i) not in store.done()]
    if not todo:
      continue
    logging.info("%s: %d of %d identities to do", name, len(todo), len(identities))
    if method.kind == "base":
      train = None
    elif method.kind == "personalize":
      train = personalize_method(config, method, cache)
    elif method.kind == "lidb_dreambooth":
      train = lidb_dreambooth_method(config, method, sd, frozen, generate_base)
    elif method.kind == "lora_dreambooth":
      train = lora_dreambooth_method(config, method, sd, frozen, generate_base)
    elif method.kind == "dreambooth":
      train = dreambooth_method(config, method, sd, frozen, generate_base)
    elif method.kind == "textual_inversion":
      train = inversion_method(config, method, sd, frozen)
    else:
      raise app.UsageError(f"config.methods.{name}.kind: unknown {method.kind!r}")
    for start in tqdm(range(0, len(todo), chunk), desc=name, unit="chunk"):
      picked = todo[start:start + chunk]
      seconds, trained = [], []
      for k in picked:
        began = time.perf_counter()
        if train is not None:
          kind, tree = train(photos[k].astype(np.float32) / 127.5 - 1.0)
          trained.append((kind, jax.tree_util.tree_map(np.asarray, tree)))
        seconds.append(time.perf_counter() - began if train is not None else None)
      noise = [noise_of(k) for k in picked]
      key = jax.random.key(config.seed)  # unused: the noise is given
      if train is None:
        padded = noise + [noise[0]] * (chunk - len(noise))
        images = generate_base(frozen, None, None, cond, uncond, key, config.guidance_scale,
                               np.concatenate(padded))
      elif trained[0][0] == "lora":  # all identities in one batch, through the side path
        loras = [tree for _, tree in trained]
        padded = loras + [loras[0]] * (chunk - len(loras))   # one compiled shape
        stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *padded)
        images = generate(frozen, stacked, cond, uncond, key, config.guidance_scale,
                          np.concatenate(noise + [noise[0]] * (chunk - len(noise))))
      else:  # whole components changed: one identity at a time
        images = np.concatenate([
            generate_base({**frozen, **tree}, None, None, cond_one, uncond_one, key,
                          config.guidance_scale, noise[j])
            for j, (_, tree) in enumerate(trained)])
      images = np.asarray(images)
      lines = []
      for j, k in enumerate(picked):
        own = images[j * rows:(j + 1) * rows]
        lines.append({"identity": int(identities[k]), "seconds": seconds[j],
                      "scores": score(k, own)})
        if k < SHOWN_IDENTITIES:
          files.save_grid(np.concatenate([photos[k:k + 1].astype(np.float32) / 127.5 - 1.0,
                                          own[[p * config.seeds for p in shown_prompts]]]),
                          os.path.join(workdir, "shown", f"{name}_{int(identities[k])}.png"),
                          rows=1, upscale=2)
      store.append(lines)
      if stop.requested:
        logging.warning("stopped after a chunk of %s (results saved): rerun the same "
                        "command to continue", name)
        return

  summary = write_summary(config, workdir, prompts)
  with files.atomic_path(os.path.join(workdir, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(markdown_table(summary) + "\n")
  write_figure(config, workdir, identities[:SHOWN_IDENTITIES],
               [prompts[p] for p in shown_prompts])
  write_plot(summary, os.path.join(workdir, "plot.png"))
  print(json_table(summary))


def write_figure(config, workdir: str, shown_identities, shown_prompts: list[str]) -> None:
  """samples.png: a row per method, labelled; per shown identity its photo and samples of
  the plain prompt, a background and a style (the same noise in every row)."""
  from PIL import Image
  rows, labels = [], []
  for name in config.methods:
    paths = [os.path.join(workdir, "shown", f"{name}_{int(i)}.png") for i in shown_identities]
    if not all(os.path.exists(p) for p in paths):
      continue
    tiles = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1.0 for p in paths]
    rows.append(np.concatenate([t.reshape(t.shape[0], -1, t.shape[0], 3).transpose(1, 0, 2, 3)
                                for t in tiles]))
    labels.append(name)
  if rows:
    grid = files.labelled_rows(rows, labels)
    with files.atomic_path(os.path.join(workdir, "samples.png")) as tmp:
      Image.fromarray(grid).save(tmp, format="PNG")
    logging.info("columns: per identity its photo, then %s",
                 ", ".join(repr(p) for p in shown_prompts))


def write_summary(config, workdir: str, prompts: list[str]) -> dict:
  """summary.json from every method's raw results (drops against the base's)."""
  table, raw = {}, {}
  for name in config.methods:
    lines = evaluate.ResultsFile(os.path.join(workdir, "results"), name).read()
    if lines:
      table[name] = evaluate.summarize(lines, config.seeds)
      raw[name] = lines
  reference = config.get("reference_method", "full")
  scoring = config.get("scoring", "recognizer")
  spec = evaluate.SCORINGS[scoring]
  if reference in raw:  # paired: the same identities and noise
    for name, row in table.items():
      if name != reference:
        row["minus_" + reference] = {
            metric: evaluate.paired_difference(raw[name], raw[reference], config.seeds, metric)
            for metric in spec["paired"]}
  if "base" in table:
    base = table["base"]
    for name, row in table.items():
      for metric in spec["context"]:
        if row.get(metric) is not None and base.get(metric) is not None:
          row[metric + "_drop"] = base[metric] - row[metric]
      if row.get(spec["gain"]) is not None and base.get(spec["gain"]) is not None:
        row[spec["gain"] + "_gain"] = row[spec["gain"]] - base[spec["gain"]]
  summary = {"command": "python -m train.evaluate " + files.portable_command(sys.argv[1:], REPO),
             "scoring": scoring,
             "identities": config.identities, "prompts": prompts, "seeds": config.seeds,
             "sample_steps": config.sample_steps, "guidance_scale": config.guidance_scale,
             "methods": {k: {key: files.portable_path(v, REPO) if isinstance(v, str)
                                 and os.path.isabs(v) else v
                                 for key, v in config.methods[k].to_dict().items()}
                         for k in table},
             "table": table}
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def write_plot(summary: dict, path: str) -> None:
  """plot.png: identity accuracy (plain prompt) against context accuracy (background and
  style on the identifier prompts), one point per method with its 95% intervals; and the
  seconds per personalization. Needs matplotlib (the [test] extra has it)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: no %s", path)
    return
  table = summary["table"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
  scoring = summary.get("scoring", "recognizer")
  spec = evaluate.SCORINGS[scoring]
  y_name = spec["gain"]
  for name, row in table.items():
    context = np.nanmean([np.nan if row.get(m) is None else row[m] for m in spec["context"]])
    if row.get(y_name) is None or np.isnan(context):
      continue
    lo, hi = row[y_name + "_ci95"] or (row[y_name],) * 2
    left.errorbar(context, row[y_name], yerr=[[row[y_name] - lo], [hi - row[y_name]]],
                  fmt="o", capsize=3)
    left.annotate(name, (context, row[y_name]), textcoords="offset points",
                  xytext=(5, 4), fontsize=8)
  if scoring == "recognizer":
    left.set_xlabel("context accuracy (background, style; identifier prompts)")
    left.set_ylabel("identity accuracy (plain prompt)")
  else:
    left.set_xlabel("CLIP-T (identifier prompts, identifier removed)")
    left.set_ylabel("Face Rec (plain prompt; 1 - dlib descriptor distance)")
  left.set_title(f"{summary['identities']} held-out identities, 95% CI")
  timed = [(name, row["seconds_median"]) for name, row in table.items()
           if row["seconds_median"] is not None]
  if timed:
    right.barh([n for n, _ in timed], [t for _, t in timed])
    right.set_xscale("log")
    right.set_xlabel("seconds per personalization (median; training + prediction)")
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def markdown_table(summary: dict) -> str:
  """The table for docs: mean [95% CI] over identities; paired differences against the
  reference method. One table per scoring present (its columns: evaluate.SCORINGS)."""
  def cell(row, name, ci=True):
    value = row.get(name)
    if value is None:
      return "-"
    interval = row.get(name + "_ci95") if ci else None
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"
  fmt = lambda d: "-" if d is None or d["ci95"] is None else (
      f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
  lines = []
  for scoring, spec in evaluate.SCORINGS.items():
    rows = [(n, r) for n, r in summary["table"].items() if evaluate.scoring_of(r) == scoring]
    if not rows:
      continue
    header = ("| method | identities | " + " | ".join(h for _, h, _ in spec["columns"])
              + " | seconds per personalization (median) |")
    lines += ([""] if lines else []) + [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in rows:
      seconds = row.get("seconds_median")
      lines.append(" | ".join(
          [f"| {name}", str(row["identities"])]
          + [cell(row, key, ci) for key, _, ci in spec["columns"]]
          + ["-" if seconds is None else f"{seconds:.2f}"]) + " |")
    paired = [(name, row) for name, row in rows if any(k.startswith("minus_") for k in row)]
    if paired:
      reference = next(k for k in paired[0][1] if k.startswith("minus_"))[len("minus_"):]
      headers = dict((key, h) for key, h, _ in spec["columns"])
      lines += ["", f"Paired against {reference} (the same identities and noise; mean "
                f"difference [95% CI], negative: {reference} is higher):", "",
                "| method | " + " | ".join(headers[m] for m in spec["paired"]) + " |",
                "|---|" + "---|" * len(spec["paired"])]
      for name, row in paired:
        diff = row["minus_" + reference]
        lines.append(f"| {name} | " + " | ".join(fmt(diff.get(m)) for m in spec["paired"])
                     + " |")
  return "\n".join(lines)


def json_table(summary: dict) -> str:
  """The table as text: one line per method (a header per scoring present)."""
  fmt = lambda x, w=6: f"{x:{w}.3f}" if x is not None else " " * (w - 1) + "-"
  lines = []
  for scoring, spec in evaluate.SCORINGS.items():
    rows = [(n, r) for n, r in summary["table"].items() if evaluate.scoring_of(r) == scoring]
    if not rows:
      continue
    columns = spec["text"] + (("seconds_median", "s/id", 6),)
    lines.append(f"{'method':22s}" + "".join(f" {label:>{w}s}" for _, label, w in columns))
    for name, row in rows:
      lines.append(f"{name:22s}" + "".join(f" {fmt(row.get(key), w)}" for key, _, w in columns))
  return "\n".join(lines)


if __name__ == "__main__":
  define_flags()
  app.run(main)
