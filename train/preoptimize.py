r"""Pre-optimization: LiDB weights for every identity of a face dataset (HyperDreamBooth 1.2).

    python -m train.preoptimize --config configs/preopt_mini.py --workdir workdir/preopt_mini

For every identity, optimizes its LiDB weights with prompt "a [V] face" on its reference
photo(s), many identities at once: a block of `per_device_block` identities per device,
vmapped, the blocks sharded over the mesh's `data` axis by jit (see hdb_jax/preopt.py).
With `config.distributed.initialize`, every process of a multi-host job reads only its own
rows of each block and writes its own shards. Writes to --workdir:
  weights/       the weights dataset (hdb_jax/weights_dataset.py); weights/index.json last
  summary.json   losses: mean and quantiles of the final train loss and of a fixed-noise
                 eval loss before/after; losses.csv: the same per identity
  checkpoints/   orbax progress (identity position, step, the block in flight), saved every
                 `checkpoint_every_blocks` blocks and on SIGTERM/SIGINT (then exit 0)
  provenance.json  what made the weights: resolved config, command, identities and a
                 fingerprint of the photos read, steps, code commit (hdb_jax/provenance.py)
Rerunning the same command continues (also after SIGKILL); a finished run exits at once.
"""

import collections
import csv
import json
import os
import shutil
import time

from absl import app, flags, logging
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import checkpoint, distributed, files, lidb, logs, models, preopt, provenance
from hdb_jax import params as params_lib
from hdb_jax import weights_dataset

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.mark_flags_as_required(["config", "workdir"])


def open_identities(cfg, image_size: int):
  """(identities [N] int64, read(positions) -> examples of those identities).

  examples: {"images": uint8 [n, num_images, S, S, 3], "captions": [n][num_images] str
  or None (dataset captions, when `cfg.captions`), "face_masks": uint8 [n, num_images,
  S, S] or None (when the records carry them)}. Sources: synthetic_faces (records grouped
  by identity; `photo_style` picks the views of one style, -1 all of them), face_folder
  (your photos: one subfolder or file per identity, all photos), or random (stand-in with
  the data contract's shapes: smoke runs, benchmarks)."""
  if cfg.source == "random":
    identities = np.arange(cfg.random_identities, dtype=np.int64)

    def read_random(positions):
      images = np.stack([np.random.default_rng([cfg.random_seed, int(identities[p])]).integers(
          0, 256, (cfg.num_images, image_size, image_size, 3), dtype=np.uint8)
          for p in positions])
      return {"images": images, "captions": None, "face_masks": None}
    return identities, read_random
  from hdb_jax import data
  if cfg.source == "synthetic_faces":
    from hdb_jax.mini import dataset  # the mini world, picked by config
    records = dataset.source(cfg.config, cfg.split, cfg.data_dir or None)
    where = f"synthetic_faces/{cfg.config}:{cfg.split}"
  elif cfg.source == "face_folder":
    records = data.folder_source(cfg.folder, cfg.data_dir or None, image_size)
    where = cfg.folder
  else:
    raise app.UsageError(f"config.data.source must be 'synthetic_faces', 'face_folder' or "
                         f"'random', got {cfg.source!r}")
  ranges = data.identity_ranges(records)
  if cfg.max_identities:
    ranges = ranges[:cfg.max_identities]
  identities = np.array([identity for identity, _, _ in ranges], np.int64)
  if len(identities) and identities.max() >= 2**31:
    raise ValueError(f"{where}: identity ids must be < 2**31 (PRNG fold_in), got "
                     f"{identities.max()}")

  def read_records(positions):
    picked = []
    for p in positions:
      identity, start, stop = ranges[p]
      views = [records[i] for i in range(start, stop)]
      if cfg.photo_style >= 0:
        views = [v for v in views if int(v.get("style", 0)) == cfg.photo_style]
      if not views:
        raise ValueError(f"{where}: identity {identity} has no style-{cfg.photo_style} photo")
      if views[0]["image"].shape != (image_size, image_size, 3):
        raise ValueError(f"{where}: images are {views[0]['image'].shape}, the model takes "
                         f"{image_size}x{image_size}x3")
      picked.append([views[i % len(views)] for i in range(cfg.num_images)])
    has_masks = "face_mask" in picked[0][0]
    if cfg.captions and "caption" not in picked[0][0]:
      raise ValueError(f"{where}: config.data.captions is set but the records have no caption")
    return {"images": np.stack([[v["image"] for v in row] for row in picked]),
            "captions": [[v["caption"] for v in row] for row in picked] if cfg.captions else None,
            "face_masks": (np.stack([[v["face_mask"] for v in row] for row in picked])
                           if has_masks else None)}
  return identities, read_records


def identifier_prompt(caption: str, token: str, class_name: str) -> str:
  """A dataset caption with the identifier before its class word: "a sketch of a face on
  a blue background" -> "a sketch of a sks face on a blue background"."""
  words = caption.split()
  if class_name not in words:
    raise ValueError(f"caption {caption!r} has no class word {class_name!r}")
  index = words.index(class_name)
  return " ".join(words[:index] + [token] + words[index:])


def prompt_ids(sd, examples: dict, prompt: str, token: str, class_name: str) -> np.ndarray:
  """Token ids [n, num_images, L] of each image's prompt: `prompt` for every image, or
  each dataset caption with the identifier inserted."""
  count, per_identity = examples["images"].shape[:2]
  if examples["captions"] is None:
    return np.broadcast_to(sd.tokenize([prompt])[None], (count, per_identity, sd.max_length))
  texts = [identifier_prompt(c, token, class_name) for row in examples["captions"] for c in row]
  return sd.tokenize(texts).reshape(count, per_identity, -1)


def data_source(cfg) -> str:
  """Where config.data reads, for provenance.json."""
  if cfg.source == "synthetic_faces":
    return f"synthetic_faces/{cfg.config}:{cfg.split}"
  return cfg.source + (f" {cfg.folder}" if cfg.source == "face_folder" else "")


def examples_read(read_examples, count: int, block: int = 256):
  """Every identity's photos (and face masks, captions) as the run read them, in blocks:
  what provenance.json's data fingerprint covers."""
  for first in range(0, count, block):
    examples = read_examples(range(first, min(first + block, count)))
    yield examples["images"]
    if examples["face_masks"] is not None:
      yield examples["face_masks"]
    if examples["captions"] is not None:
      yield np.frombuffer("\0".join(c for row in examples["captions"] for c in row).encode(),
                          np.uint8)


def write_summary(workdir: str, dataset_dir: str, identities_this_run: int,
                  seconds: float) -> dict:
  dataset = weights_dataset.open_dataset(dataset_dir)
  summary = {"num_identities": len(dataset), "identities_this_run": identities_this_run,
             "seconds_this_run": round(seconds, 1),
             "identities_per_second": round(identities_this_run / max(seconds, 1e-9), 3)}
  for name, values in dataset.stats.items():
    q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
    summary[name] = {"mean": float(values.mean()), "std": float(values.std()),
                     "quantiles_0_10_50_90_100": [round(float(v), 5) for v in q]}
  if "eval_loss_after" in dataset.stats:
    better = dataset.stats["eval_loss_after"] < dataset.stats["eval_loss_before"]
    summary["fraction_eval_loss_improved"] = float(better.mean())
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  with files.atomic_path(os.path.join(workdir, "losses.csv")) as tmp, open(tmp, "w") as f:
    writer = csv.writer(f)
    writer.writerow(["identity"] + list(dataset.stats))
    for i, identity in enumerate(dataset.identities):
      writer.writerow([int(identity)] + [f"{v[i]:.6f}" for v in dataset.stats.values()])
  return summary


def extend_from(source: str, dataset_dir: str, identities: np.ndarray, spec: lidb.LiDBSpec,
                shard_meta: dict, copy: bool) -> int:
  """Adopt `source`, a finished weights dataset of the same run on the first identities of
  this one (made with a smaller data.max_identities): copy its shards into `dataset_dir`
  (when `copy`) and return how many identities they hold, the first position to compute.

  Checked: the identities are this run's first ones, the LiDB spec, and the metadata the
  shards record (base fingerprint, prompt, steps, learning rate, seed, data apart from
  max_identities, and the other optimization settings when the source recorded them)."""
  dataset = weights_dataset.open_dataset(source)
  count = len(dataset)
  if count > len(identities) or not np.array_equal(np.sort(identities[:count]),
                                                   dataset.identities):
    raise ValueError(f"{source}: its {count} identities are not the first {count} of this "
                     f"run's {len(identities)}")
  if weights_dataset.spec_to_json(dataset.spec) != weights_dataset.spec_to_json(spec):
    raise ValueError(f"{source}: made with another LiDB spec")
  theirs = dict(dataset.metadata)
  for key, value in shard_meta.items():
    if key not in theirs and key == "optimization":
      continue  # datasets written before this was recorded
    mine, other = value, theirs.get(key)
    if key == "data":
      mine, other = json.loads(mine), json.loads(other or "{}")
      mine.pop("max_identities"), other.pop("max_identities", None)
    if mine != other:
      raise ValueError(f"{source}: made with another {key} ({other!r}, this run: {mine!r})")
  if copy:
    for entry in weights_dataset.list_shards(source):
      shutil.copyfile(os.path.join(source, entry[0]), os.path.join(dataset_dir, entry[0]))
  return count


def run(config, workdir: str) -> bool:
  """Pre-optimize every identity of `config.data` into `workdir`. Returns True when the
  weights dataset is complete, False when stopped by a signal (progress saved)."""
  stop = checkpoint.StopFlag()
  try:
    return _run(config, workdir, stop)
  finally:
    stop.restore()


def _run(config, workdir, stop) -> bool:
  run = config.preopt
  is_main = jax.process_index() == 0
  dataset_dir = os.path.join(workdir, "weights")
  os.makedirs(dataset_dir, exist_ok=True)
  if is_main:
    with files.atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
      f.write(config.to_json(indent=2))

  sd, frozen = models.load_or_build(config.model)
  spec = lidb.make_spec(frozen, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  aux = lidb.make_aux(spec)
  prompt = config.prompt.format(token=config.token, class_name=config.class_name)
  identities, read_examples = open_identities(config.data, sd.image_size)

  num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])
  optimizer = (optax.adamw(run.learning_rate, weight_decay=run.weight_decay)
               if run.weight_decay else optax.adam(run.learning_rate))
  fns = preopt.make_block_fns(
      sd, spec, optimizer, mesh, seed=run.seed, batch_size=run.batch_size,
      eval_batch_size=run.eval_batch_size, residual=run.residual, hflip=run.hflip,
      face_background_weight=run.face_background_weight, shared_init=run.shared_init,
      init_seed=None if run.init_seed < 0 else run.init_seed, remat=run.get("remat", "none"))
  base_fingerprint = params_lib.fingerprint(frozen, spec.layers)
  frozen, aux = preopt.replicate((frozen, aux), fns.replicated)
  global_block = run.per_device_block * num_devices
  optimization = {k: run[k] for k in ("batch_size", "hflip", "face_background_weight",
                                      "shared_init", "init_seed", "weight_decay")}
  shard_meta = {"base_fingerprint": base_fingerprint,
                "prompt": prompt, "steps": str(run.steps), "learning_rate": str(run.learning_rate),
                "seed": str(run.seed), "data": json.dumps(config.data.to_dict(), sort_keys=True),
                "optimization": json.dumps(optimization, sort_keys=True)}

  # Progress: the first identity position not yet written, and the block in flight. The
  # layout (devices, block size, steps per call) may change between runs; what decides
  # the weights may not.
  run_id = params_lib.stable_hash32(params_lib.to_json({
      "base": base_fingerprint, "lidb": config.lidb.to_dict(), "data": config.data.to_dict(),
      "prompt": prompt, "preopt": {k: run[k] for k in (
          "steps", "batch_size", "learning_rate", "seed", "hflip", "face_background_weight",
          "shared_init", "init_seed", "weight_decay")}}))
  ckpt = checkpoint.manager(workdir)
  progress = {"position": 0, "step": 0, "global_block": global_block, "run_id": run_id}
  if ckpt.latest_step() is not None:
    progress = ckpt.restore(ckpt.latest_step(), args=ocp.args.Composite(
        progress=ocp.args.JsonRestore()))["progress"]
    if progress.get("run_id") != run_id:
      raise app.UsageError(f"{workdir}: holds a run with another base, data, LiDB or "
                           "optimization config; use a new --workdir")
  start = progress["position"]
  if ckpt.latest_step() is None and run.get("extend"):
    start = extend_from(run.extend, dataset_dir, identities, spec, shard_meta, copy=is_main)
    logging.info("extending %s: its %d identities copied", run.extend, start)
    progress = {**progress, "position": start}
  layout = preopt.make_layout(len(identities) - start, run.per_device_block,
                              fns.identity_sharding)
  if is_main:
    removed = weights_dataset.remove_shards_from(dataset_dir, start)
    if removed:
      logging.info("removed %d shards of an interrupted run: %s", len(removed), removed[:3])
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("preopt: stale shards removed")
  logging.info("%d identities, %d done; %d blocks of %d (%d per device x %d devices), "
               "%d steps, LiDB %d values, residual=%s", len(identities), start,
               layout.num_blocks, global_block, run.per_device_block, num_devices, run.steps,
               spec.num_trainable, run.residual)

  bar = tqdm(total=len(identities), initial=start, unit="id", desc="pre-optimization",
             disable=not is_main, smoothing=0.1)
  buffer, flush_start, began = [], start, time.time()

  def flush(position):
    """Write this process's finished rows [flush_start, position) as one shard."""
    nonlocal buffer, flush_start
    if buffer:
      rows = {k: np.concatenate([b[k] for b in buffer]) for k in ("identity", "stats")}
      train_rows = jax.tree_util.tree_map(lambda *x: np.concatenate(x),
                                          *[b["train"] for b in buffer])
      stats = {name: rows["stats"][:, i] for i, name in enumerate(weights_dataset.STATS)
               if run.eval_batch_size or name == "train_loss"}
      weights_dataset.write_shard(
          dataset_dir, weights_dataset.shard_name(jax.process_index(), flush_start, position),
          rows["identity"], train_rows, stats, spec, shard_meta)
    buffer, flush_start = [], position

  def save_progress(position, step, block_state):
    checkpoint_id = position * run.steps + step  # increases monotonically
    ckpt.save(checkpoint_id, args=ocp.args.Composite(
        progress=ocp.args.JsonSave({"position": position, "step": step,
                                    "global_block": global_block, "run_id": run_id}),
        block=ocp.args.StandardSave(block_state)), force=True)

  for block in range(layout.num_blocks):
    positions = start + layout.local_positions(block)                  # this process's rows
    valid = positions < len(identities)
    block_ids = np.where(valid, identities[np.minimum(positions, len(identities) - 1)], 0)
    examples = read_examples(np.minimum(positions, len(identities) - 1))  # padding: repeats
    if run.face_background_weight is not None and examples["face_masks"] is None:
      raise ValueError(f"config.preopt.face_background_weight={run.face_background_weight}: "
                       f"the {config.data.source} records carry no face_mask")
    input_ids = prompt_ids(sd, examples, prompt, config.token, config.class_name)
    ids_global = preopt.global_block_array(block_ids.astype(np.int32), fns.identity_sharding,
                                           global_block)
    to_global = lambda rows: preopt.global_block_array(rows, fns.identity_sharding,
                                                       global_block)
    pool = fns.encode(frozen["vae"], to_global(examples["images"]), to_global(input_ids),
                      None if run.face_background_weight is None
                      else to_global(examples["face_masks"]))
    train, opt_state = fns.init(ids_global)
    first_step = 0
    block_start = start + block * global_block
    if block == 0 and progress["step"] and progress["global_block"] == global_block:
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                        {"train": train, "opt_state": opt_state})
      state = ckpt.restore(ckpt.latest_step(), args=ocp.args.Composite(
          block=ocp.args.StandardRestore(abstract)))["block"]
      train, opt_state, first_step = state["train"], state["opt_state"], progress["step"]
      logging.info("resuming block at position %d from step %d", block_start, first_step)
    recent_losses = collections.deque(maxlen=run.loss_window)  # device arrays [G]: no sync
    for step in range(first_step, run.steps):
      train, opt_state, losses = fns.train(train, opt_state, frozen, aux, pool, ids_global,
                                           preopt.replicate(np.int32(step), fns.replicated))
      recent_losses.append(losses)
      bar.set_postfix(step=step + 1, refresh=False)
      if stop.agreed():
        flush(block_start)
        save_progress(block_start, step + 1, {"train": train, "opt_state": opt_state})
        ckpt.wait_until_finished()
        ckpt.close()
        bar.close()
        logging.warning("stopped: progress saved at identity %d, step %d; rerun the same "
                        "command to continue", block_start, step + 1)
        return False
    # Train loss: mean over the last `loss_window` steps of this run (fewer after a resume).
    stats = [np.mean([preopt.local_rows(l) for l in recent_losses], axis=0)]
    # never write weights that are not finite
    preopt.check_finite(stats[0][valid], identities[positions[valid]],
                        f"block at position {block_start}, step {run.steps}", workdir)
    if run.eval_batch_size:
      base_train, _ = fns.init(ids_global)  # dW = 0 at init: the base model's loss
      stats += [preopt.local_rows(fns.evaluate(t, frozen, aux, pool, ids_global))
                for t in (base_train, train)]
    else:
      stats += [np.full_like(stats[0], np.nan)] * 2
    train_rows = preopt.local_rows(train)
    buffer.append({"identity": identities[positions[valid]],
                   "train": jax.tree_util.tree_map(lambda x: x[valid], train_rows),
                   "stats": np.stack(stats, axis=1)[valid]})
    done = min(block_start + global_block, len(identities))
    bar.update(done - bar.n)
    if (block + 1) % run.checkpoint_every_blocks == 0 or block + 1 == layout.num_blocks:
      flush(done)
      save_progress(done, 0, {"train": train, "opt_state": opt_state})
  bar.close()
  ckpt.wait_until_finished()
  ckpt.close()

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("preopt: all shards written")
  if is_main:
    weights_dataset.finalize(dataset_dir, identities, {"prompt": prompt, **shard_meta})
    summary = write_summary(workdir, dataset_dir, len(identities) - start,
                            time.time() - began)
    provenance.write(workdir, provenance.record(
        config, steps=run.steps, repo=REPO, base_fingerprint=base_fingerprint,
        data=provenance.data_record(data_source(config.data), identities,
                                    examples_read(read_examples, len(identities)))))
    logging.info("wrote %s (%d identities); summary: %s", dataset_dir, len(identities),
                 json.dumps({k: v for k, v in summary.items() if k != "num_identities"}))
  return True


def main(argv):
  del argv
  distributed.initialize(FLAGS.config.distributed)
  logs.quiet_libraries()
  run(FLAGS.config, FLAGS.workdir)  # stopped by a signal: progress saved, exit 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
