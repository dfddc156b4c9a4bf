r"""Train the mini world's recognizer on renderer ground truth (hdb_jax/mini/recognizer.py).

    python -m train.train_recognizer --config configs/recognizer.py --workdir workdir/recognizer

Writes to --workdir:
  recognizer/        weights (safetensors) + recognizer.json (architecture, training,
                     held-out accuracy per head, clean and augmented, per style) +
                     provenance.json (resolved config, command, steps, code commit);
                     --config.out=DIR writes there instead (assets/recognizer: committed)
  holdout.png        held-out renders (top) and non-faces (bottom) as evaluated
  log.jsonl          loss and batch accuracy every config.train.log_every steps
  checkpoints/       orbax; rerunning the same command resumes from the newest one
"""

import json
import os
import time

from absl import app, flags, logging
import jax
import numpy as np
import optax
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import checkpoint, files, logs, provenance
from hdb_jax import params as params_lib
from hdb_jax.mini import recognizer, render

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.mark_flags_as_required(["config", "workdir"])


def render_items(rng, n, negative_fraction, exclude):
  """n labelled training items (faces outside `exclude` and non-faces), shuffled."""
  num_negatives = int(round(n * negative_fraction))
  batch = recognizer.labelled_batch(recognizer.random_faces(rng, n - num_negatives, exclude),
                                    recognizer.non_faces(rng, num_negatives))
  order = rng.permutation(n)
  return batch["images"][order], batch["labels"][order]


def evaluate_holdout(predict, params, holdout, key):
  """Held-out accuracy per head: clean, augmented (blur/noise/colour), and per style."""
  clean = predict(params, holdout["images"])
  augmented_images = files.to_uint8(recognizer.augment(key, recognizer.to_float(holdout["images"])))
  result = {"clean": recognizer.head_accuracy(clean, holdout["labels"]),
            "augmented": recognizer.head_accuracy(predict(params, augmented_images),
                                                  holdout["labels"])}
  style_column = holdout["labels"][:, recognizer.HEAD_NAMES.index("style")]
  result["clean_by_style"] = {}
  for style, style_name in enumerate(render.STYLES):
    rows = style_column == style
    result["clean_by_style"][style_name] = recognizer.head_accuracy(
        {k: v[rows] for k, v in clean.items()}, holdout["labels"][rows])
  face = holdout["labels"][:, recognizer.HEAD_NAMES.index("face")] == 1
  valid = recognizer.face_validity(clean)
  result["face_validity_of_faces"] = float(valid[face].mean())
  result["face_validity_of_non_faces"] = float(valid[~face].mean())
  return result


def main(argv):
  del argv
  logs.quiet_libraries()
  config, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
    f.write(config.to_json(indent=2))
  tc = config.train
  started = time.time()

  model = recognizer.RecognizerNet(widths=tuple(tuple(w) for w in config.model.widths),
                                   hidden=config.model.hidden)
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                                tc.steps, end_value=tc.learning_rate * 0.02)
  optimizer = optax.adam(schedule)
  params = recognizer.init(model, tc.seed)
  logging.info("recognizer: %d parameters", params_lib.count(params))
  state = {"params": params, "opt_state": optimizer.init(params)}
  ckpt = checkpoint.manager(workdir)
  start, state = checkpoint.restore_latest(ckpt, state)
  if start:
    logging.info("resuming from step %d (the render pool starts anew)", start)

  holdout_ids = recognizer.holdout_identities(config.eval.dataset_config)
  pool_images, pool_labels = render_items(np.random.default_rng([tc.seed, 0]), tc.pool_size,
                                          tc.negative_fraction, holdout_ids)
  logging.info("render pool: %d items in %.0f s", tc.pool_size, time.time() - started)

  step_fn = recognizer.make_train_step(model, optimizer)
  key = jax.random.key(tc.seed)
  params, opt_state = state["params"], state["opt_state"]
  log_path = os.path.join(workdir, "log.jsonl")
  bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="recognizer",
             unit="step")
  for step in bar:
    rng = np.random.default_rng([tc.seed, 1, step])
    batch = rng.integers(tc.pool_size, size=tc.batch_size)
    params, opt_state, loss, accuracy = step_fn(params, opt_state, pool_images[batch],
                                                pool_labels[batch], jax.random.fold_in(key, step))
    # Refresh part of the pool while the step runs (JAX dispatch is asynchronous).
    slots = rng.choice(tc.pool_size, tc.fresh_per_step, replace=False)
    pool_images[slots], pool_labels[slots] = render_items(rng, tc.fresh_per_step,
                                                          tc.negative_fraction, holdout_ids)
    done = step + 1
    if done % tc.log_every == 0 or done == tc.steps:
      accuracy = {k: float(v) for k, v in accuracy.items()}
      bar.set_postfix(loss=f"{float(loss):.3f}", worst=f"{min(accuracy.values()):.3f}")
      with open(log_path, "a") as f:
        f.write(json.dumps({"step": done, "loss": float(loss), "accuracy": accuracy}) + "\n")
    if done % tc.checkpoint_every == 0 or done == tc.steps:
      checkpoint.save(ckpt, done, {"params": params, "opt_state": opt_state})
  ckpt.wait_until_finished()

  ec = config.eval
  holdout = recognizer.holdout_renders(holdout_ids, ec.images_per_identity, ec.num_negatives,
                                       ec.seed)
  predict = recognizer.make_predict(model)
  accuracy = evaluate_holdout(predict, params, holdout, jax.random.key(ec.seed))
  rows = 8
  shown = np.concatenate([holdout["images"][:rows * 12], holdout["images"][-rows * 4:]])
  files.save_grid(recognizer.to_float(shown), os.path.join(workdir, "holdout.png"), rows=rows,
                  upscale=2)
  info = {
      "model": {"widths": [list(w) for w in config.model.widths], "hidden": config.model.hidden},
      "num_params": params_lib.count(params),
      "heads": {name: list(values) for name, values in recognizer.HEADS},
      "train": dict(config.train) | {"minutes": round((time.time() - started) / 60, 1)},
      "holdout": {"identities": f"holdout split of synthetic_faces/{ec.dataset_config} "
                                f"({len(holdout_ids)} identities, never trained on)",
                  "images_per_identity": ec.images_per_identity,
                  "num_negatives": ec.num_negatives, "view_seed": ec.seed,
                  "accuracy": accuracy},
  }
  out = config.out or os.path.join(workdir, "recognizer")
  recognizer.save(out, params, info)
  provenance.write(out, provenance.record(
      config, steps=tc.steps, repo=REPO, data=provenance.data_record(
          "procedural renders (hdb_jax/mini/render.py) from config.train.seed, faces of "
          f"every identity but the {len(holdout_ids)} of the holdout split of "
          f"synthetic_faces/{ec.dataset_config}, and non-faces",
          arrays=[np.asarray(holdout_ids)], excluded_identities=len(holdout_ids))))
  for name, value in accuracy["clean"].items():
    logging.info("held-out accuracy %-12s clean %.4f  augmented %.4f", name, value,
                 accuracy["augmented"][name])
  logging.info("wrote %s in %.1f min", out, (time.time() - started) / 60)


if __name__ == "__main__":
  define_flags()
  app.run(main)
