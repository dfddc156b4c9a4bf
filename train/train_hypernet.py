r"""Train the hypernetwork: one face image -> its LiDB weights (HyperDreamBooth).

    python -m train.train_hypernet --config configs/hypernet_mini.py --workdir workdir/hypernet

Reads the pre-optimized weights dataset (`config.data.weights`, the targets) and each of
its identities' reference photo, then trains `hdb_jax/hypernet.py` with
`alpha * diffusion loss (predicted weights, side path) + beta * weight-space loss`,
one jitted optax step per batch, the batch sharded over the mesh's `data` axis (the
frozen base replicated, or split along `fsdp`). Writes to --workdir:
  hypernet/      the trained hypernetwork (hypernet.safetensors + hypernet.json), last
  tensorboard/   event files: losses, grad norm, lr, held-out identity accuracy, and
                 images (held-out reference photo | hypernetwork-only samples)
  checkpoints/   orbax, every `checkpoint_every` steps and on SIGTERM/SIGINT (then exit);
                 rerunning the same command resumes
  log.jsonl      the logged scalars
hypernet/provenance.json records what made it: the resolved config, the command, the
identities and a fingerprint of their photos and targets, the steps and the code commit.
"""

import json
import os
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import (checkpoint, distributed, files, hypernet, hypernet_train, lidb, logs,
                     models, preopt, provenance, tensorboard, weights_dataset)
from hdb_jax import params as params_lib

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PURPOSE_INIT, PURPOSE_BATCH, PURPOSE_EVAL = 0, 1, 2


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/hypernet_*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.DEFINE_bool("log_reads", False, "Append the batch rows and identities this process "
                    "read at each step to <workdir>/reads-p<process>.jsonl (a check of how "
                    "a multi-process job splits the data; not part of the recipe).")
  flags.mark_flags_as_required(["config", "workdir"])


def data_parts(cfg, image_size: int):
  """The photos of the identities, held-out photos to watch, and a scorer, by source.

  -> (photos(split, identities) -> {"images" uint8 [N, S, S, 3], "face_masks" [N, S, S]
      or absent}, held-out identities [M], score(images, identities) -> identity accuracy
      per image, or None where nothing can score identity).
  synthetic_faces: the mini world's reference photos, its holdout split and recognizer.
  face_folder: your photos (`folder`, one identity per subfolder or file; its first photo
  is the reference) and held-out ones from `holdout_folder` (images only, no score).
  """
  from hdb_jax import data
  if cfg.source == "synthetic_faces":
    from hdb_jax.mini import dataset, recognizer, render  # the mini world, picked by config

    def open_split(split):
      return dataset.source(cfg.config, split, cfg.data_dir or None)
    rec = recognizer.load()

    def score(images, identities):
      truth = render.identity_attributes(np.asarray(identities))
      return recognizer.identity_accuracy(rec(images), truth)
  elif cfg.source == "face_folder":
    def open_split(split):
      folder = cfg.folder if split == cfg.split else cfg.holdout_folder
      return data.folder_source(folder, cfg.data_dir or None, image_size)
    score = None
  else:
    raise app.UsageError(f"config.data.source must be 'synthetic_faces' or 'face_folder', "
                         f"got {cfg.source!r}")

  opened = {}

  def photos(split, identities):
    if split not in opened:  # open a split once: later calls read only their rows
      records = open_split(split)
      opened[split] = records, {identity: start for identity, start, _ in
                                data.identity_ranges(records)}
    records, starts = opened[split]
    missing = [int(i) for i in identities if int(i) not in starts]
    if missing:
      raise ValueError(f"{cfg.source} {split}: no photos of identities {missing[:3]}")
    rows = records.__getitems__([starts[int(i)] for i in identities])  # reference photos
    out = {"images": np.stack([r["image"] for r in rows])}
    if "face_mask" in rows[0]:
      out["face_masks"] = np.stack([r["face_mask"] for r in rows])
    return out

  holdout_ids = np.zeros((0,), np.int64)
  if cfg.source == "synthetic_faces" or cfg.get("holdout_folder"):
    holdout_ids = np.array([i for i, _, _ in data.identity_ranges(open_split("holdout"))],
                           np.int64)
  return photos, holdout_ids, score


def data_source(cfg) -> str:
  """Where config.data's photos come from, for provenance.json."""
  if cfg.source == "synthetic_faces":
    return f"synthetic_faces/{cfg.config}:{cfg.split}"
  return f"face_folder {cfg.folder}"


def run(config, workdir: str, log_reads: bool = False) -> bool:
  """Train into `workdir`. Returns True when finished, False when stopped by a signal.
  log_reads: see the --log_reads flag."""
  stop = checkpoint.StopFlag()
  try:
    return _run(config, workdir, stop, log_reads)
  finally:
    stop.restore()


def _run(config, workdir, stop, log_reads) -> bool:
  cfg = config.train
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  sd, frozen = models.load_or_build(config.model)
  targets = weights_dataset.open_dataset(config.data.weights)
  spec = targets.spec
  lidb.check_base(spec, frozen, config.data.weights)
  fingerprint = params_lib.fingerprint(frozen, spec.layers)
  if targets.metadata.get("base_fingerprint", fingerprint) != fingerprint:
    raise ValueError(f"{config.data.weights}: pre-optimized on base "
                     f"{targets.metadata['base_fingerprint']}, config.model is {fingerprint}")
  aux = lidb.make_aux(spec)
  if config.hypernet.get("learnable_aux", False) and cfg.beta:
    raise ValueError(f"config.hypernet.learnable_aux needs config.train.beta=0, got "
                     f"{cfg.beta}: the pre-optimized targets were made with the seed's aux")
  identities = targets.identities[:config.data.max_identities or None]
  target_rows = jax.tree_util.tree_map(lambda x: x[:len(identities)], targets.train)
  photos, holdout_ids, score = data_parts(config.data, sd.image_size)
  first_photo = photos(config.data.split, identities[:1])  # the rest: by batch, below
  if cfg.face_background_weight is not None and "face_masks" not in first_photo:
    raise ValueError(f"config.train.face_background_weight={cfg.face_background_weight}: "
                     f"the {config.data.source} records carry no face_mask")
  prompt = config.prompt.format(token=config.token, class_name=config.class_name)
  input_ids = sd.tokenize([prompt])[0]                                  # [L]
  logging.info("%d identities, LiDB %d values in %d layers, prompt %r", len(identities),
               spec.num_trainable, spec.num_layers, prompt)

  num_devices = jax.device_count() if config.mesh.data == -1 else config.mesh.data
  fsdp = config.mesh.fsdp
  mesh = jax.make_mesh((num_devices // fsdp, fsdp), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:num_devices])
  layout = hypernet.weight_layout(spec)
  encoder, encoder_params, encoder_config = hypernet.make_encoder(config.hypernet.encoder)
  net = hypernet.make(layout, config.hypernet, encoder)
  tx = hypernet_train.optimizer(cfg)
  image_shape = first_photo["images"].shape[1:]
  params = jax.jit(lambda key: net.init(key, np.zeros((1,) + image_shape, np.float32),
                                        iterations=1)["params"])(
      jax.random.fold_in(jax.random.key(cfg.seed), PURPOSE_INIT))
  if encoder_params is not None:  # a pretrained encoder: its weights, not the random init
    params = dict(params, encoder=encoder_params)
  if config.hypernet.get("learnable_aux", False):  # shared by all identities, trained
    params = dict(params, **{hypernet.AUX_KEY: hypernet.aux_params(
        jax.tree_util.tree_map(np.asarray, aux), layout)})
  state = {"params": params, "opt_state": tx.init(params)}
  logging.info("hypernetwork: %s parameters", f"{params_lib.count(params):,}")
  frozen_sharding = hypernet_train.frozen_shardings(
      frozen, mesh, config.mesh.get("fsdp_min_size", 2**18))
  split = [s for s in jax.tree_util.tree_leaves(frozen_sharding) if not s.is_fully_replicated]
  logging.info("mesh data=%d x fsdp=%d over %d processes; frozen base: %d of %d arrays "
               "split over fsdp", num_devices // fsdp, fsdp, jax.process_count(), len(split),
               len(jax.tree_util.tree_leaves(frozen_sharding)))
  fns = hypernet_train.make_step(
      net, sd, tx, mesh, frozen_sharding, seed=cfg.seed, loss_kwargs=dict(
          iterations=config.hypernet.iterations, alpha=cfg.alpha, beta=cfg.beta,
          weight_loss=cfg.weight_loss, hflip=cfg.hflip, jitter=cfg.jitter,
          face_background_weight=cfg.face_background_weight, remat=cfg.get("remat", "none"),
          frozen_encoder=cfg.get("encoder_lr_scale", 1.0) == 0.0))
  frozen = jax.tree_util.tree_map(  # host copies: valid on every process of a multi-host job
      lambda x, sharding: jax.make_array_from_callback(
          x.shape, sharding, lambda index, x=np.asarray(x): x[index]), frozen, frozen_sharding)
  aux = preopt.replicate(aux, fns.replicated)

  ckpt = checkpoint.manager(workdir)
  start, state = checkpoint.restore_latest(ckpt, state)
  if start:
    logging.info("resuming from the checkpoint of step %d", start)
  state = preopt.replicate(jax.tree_util.tree_map(np.asarray, state), fns.replicated)
  writer = tensorboard.Writer(os.path.join(workdir, "tensorboard")) if is_main else None
  evaluator = (Evaluator(config, sd, net, frozen, aux, photos, holdout_ids, score)
               if cfg.eval_every and len(holdout_ids) else None)

  # This process's rows of every global batch (its devices' slices of the data axis): it
  # reads the photos of those only; the targets and token ids are small, kept whole.
  row_of_position = np.arange(cfg.batch_size)
  local_rows = np.unique(np.concatenate([
      row_of_position[index[0]] for index in
      fns.batch_sharding.addressable_devices_indices_map((cfg.batch_size,)).values()]))
  local_position = np.full(cfg.batch_size, -1)           # global row -> row of `local_rows`
  local_position[local_rows] = np.arange(len(local_rows))
  rows_read = 0  # photos read by this process this run (logged at the end)
  reads_file = (os.path.join(workdir, f"reads-p{jax.process_index()}.jsonl")
                if log_reads else None)

  def global_batch(step):
    """The same global batch indices on every process; each reads and places its rows."""
    nonlocal rows_read
    rng = np.random.default_rng([cfg.seed, PURPOSE_BATCH, step])
    index = rng.integers(0, len(identities), cfg.batch_size)
    local = photos(config.data.split, identities[index[local_rows]])  # [local rows, ...]
    rows_read += len(local_rows)
    if reads_file:
      with open(reads_file, "a") as f:
        f.write(json.dumps({"step": step, "rows": local_rows.tolist(), "identities": [
            int(i) for i in identities[index[local_rows]]]}) + "\n")

    def place(x, local_only):  # -> global array [batch_size, ...] sharded over "data"
      shape = (cfg.batch_size,) + x.shape[1:]
      if local_only:
        return jax.make_array_from_callback(
            shape, fns.batch_sharding, lambda i: x[local_position[row_of_position[i[0]]]])
      return jax.make_array_from_callback(shape, fns.batch_sharding, lambda i: x[i])
    batch = {"images": place(local["images"].astype(np.float32) / 127.5 - 1.0, True),
             "input_ids": place(np.broadcast_to(input_ids, (cfg.batch_size, len(input_ids))),
                                False),
             "target": jax.tree_util.tree_map(lambda x: place(x[index], False), target_rows)}
    if cfg.face_background_weight is not None:
      batch["face_masks"] = place(local["face_masks"], True)
    return batch

  try:  # the event file is closed however the run ends (stop, non-finite loss, done)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="hypernetwork",
               unit="step", disable=not is_main)
    began = time.time()
    for step in bar:
      state, metrics = fns.train(state, frozen, aux, global_batch(step), np.int32(step))
      done = step + 1
      saving = done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.requested
      if done % cfg.log_every == 0 or saving:  # never checkpoint a state that is not finite
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          raise FloatingPointError(f"step {done}: loss is {loss}; stopped, the last good "
                                   f"checkpoint is in {workdir}/checkpoints")
      if done % cfg.log_every == 0 or done == cfg.steps:
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars["learning_rate"] = float(hypernet_train.learning_rate(cfg, step))
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        if writer:
          writer.scalars(done, scalars)
          with open(os.path.join(workdir, "log.jsonl"), "a") as f:
            f.write(json.dumps(dict(scalars, step=done)) + "\n")
      if evaluator and (done % cfg.eval_every == 0 or done == cfg.steps):
        accuracy, grid = evaluator(state["params"])
        if writer:
          writer.image(done, "heldout/reference_and_samples", grid)
        if accuracy is not None:
          logging.info("step %d: held-out identity accuracy %.3f (base %.3f)", done,
                       accuracy, evaluator.base_accuracy)
          if writer:
            writer.scalars(done, {"heldout_identity_accuracy": accuracy,
                                  "heldout_identity_accuracy_base": evaluator.base_accuracy})
      saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
      if saved:
        checkpoint.save(ckpt, done, state)
      if stop.agreed() and done < cfg.steps:
        # A signal that lands on a checkpoint step: that step is being saved already
        # (orbax refuses a second save of one step).
        if saved:
          ckpt.wait_until_finished()
        else:
          checkpoint.save(ckpt, done, state, wait=True)
        logging.warning("stopped at step %d: rerun the same command to continue", done)
        return False
    ckpt.wait_until_finished()
    logging.info("process %d of %d: read the photos of %d of %d batch rows",
                 jax.process_index(), jax.process_count(), rows_read,
                 (cfg.steps - start) * cfg.batch_size)
    if is_main:
      # The provenance's fingerprint covers every identity's photo: process 0 reads them all
      # once more here (training read each process's rows only).
      train_photos = photos(config.data.split, identities)
      hypernet.save(os.path.join(workdir, "hypernet"), jax.device_get(state["params"]),
                    config.hypernet, spec, fingerprint, prompt,
                    extra={"image_size": int(image_shape[0]), "steps": cfg.steps,
                           "encoder_config": encoder_config},
                    provenance=provenance.record(
                        config, steps=cfg.steps, repo=REPO, base_fingerprint=fingerprint,
                        data=provenance.data_record(
                            data_source(config.data), identities,
                            [train_photos["images"], train_photos.get("face_masks",
                                                                      np.zeros(0, np.uint8))],
                            weights=config.data.weights,
                            weights_fingerprint=provenance.fingerprint(
                                jax.tree_util.tree_leaves(target_rows)))))
      logging.info("wrote %s/hypernet after %.1f min", workdir, (time.time() - began) / 60)
    return True
  finally:
    if writer:
      writer.close()


class Evaluator:
  """Held-out identity accuracy of hypernetwork-only samples: `eval_identities` held-out
  reference photos -> predicted weights -> `eval_samples` samples of the prompt each,
  scored by the recognizer; the base model on the same noise once, for comparison."""

  def __init__(self, config, sd, net, frozen, aux, photos, holdout_ids, score):
    cfg = config.train
    from hdb_jax import dreambooth
    self.cfg, self.frozen, self.aux, self.score = cfg, frozen, aux, score
    self.layout = net.layout
    picks = np.linspace(0, len(holdout_ids) - 1, min(cfg.eval_identities, len(holdout_ids)))
    self.identities = holdout_ids[picks.round().astype(int)]
    self.images = photos("holdout", self.identities)["images"]
    prompt = config.prompt.format(token=config.token, class_name=config.class_name)
    self.cond = np.repeat(sd.tokenize([prompt]), cfg.eval_samples, 0)
    self.uncond = np.repeat(sd.tokenize([""]), cfg.eval_samples, 0)
    self.generate = dreambooth.make_generate(sd, cfg.sample_steps)
    iterations = config.hypernet.iterations
    self.predict = jax.jit(lambda p, x: net.apply({"params": p}, x, iterations=iterations))
    self._base_accuracy = None

  def _keys(self):
    base = jax.random.fold_in(jax.random.key(self.cfg.seed), PURPOSE_EVAL)
    return [jax.random.fold_in(base, i) for i in range(len(self.identities))]

  @property
  def base_accuracy(self) -> float:
    if self._base_accuracy is None:
      scores = [self.score(np.asarray(self.generate(
          self.frozen, None, None, self.cond, self.uncond, key, self.cfg.guidance_scale)),
          [identity] * self.cfg.eval_samples)
          for identity, key in zip(self.identities, self._keys())]
      self._base_accuracy = float(np.mean(scores))
    return self._base_accuracy

  def __call__(self, params):
    """-> (mean identity accuracy or None without a scorer, image grid uint8)."""
    params, learned_aux = hypernet.split_aux(params, self.layout)
    aux = self.aux if learned_aux is None else learned_aux
    predicted = self.predict(params, self.images.astype(np.float32) / 127.5 - 1.0)
    scores, rows = [], []
    for i, (identity, key) in enumerate(zip(self.identities, self._keys())):
      weights = jax.tree_util.tree_map(lambda x: x[i], predicted)
      samples = np.asarray(self.generate(self.frozen, weights, aux, self.cond,
                                         self.uncond, key, self.cfg.guidance_scale))
      if self.score is not None:
        scores.append(self.score(samples, [identity] * len(samples)))
      if i < 8:
        rows.append(np.concatenate([self.images[i:i + 1] / 127.5 - 1.0, samples]))
    grid = files.grid_image(np.concatenate(rows), rows=len(rows))
    return (float(np.mean(scores)) if scores else None), grid


def main(argv):
  del argv
  distributed.initialize(FLAGS.config.distributed)
  logs.quiet_libraries()
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.log_reads)  # stopped by a signal: exit 0
  except Exception:
    if jax.process_count() == 1:
      raise
    # One of several processes: exit now. The usual exit waits in jax.distributed's
    # shutdown barrier for every peer: for a dead one (a killed or lost host: here the
    # error is "Gloo all-reduce failed") until its heartbeat times out (100 s), for a
    # live one stuck in a collective with this process until the barrier's own timeout.
    # Exiting makes every peer's next collective fail at once, so the whole job stops.
    logging.exception("process %d of %d failed: stopping the job; rerun the same command "
                      "on every process to resume from the last complete checkpoint",
                      jax.process_index(), jax.process_count())
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
