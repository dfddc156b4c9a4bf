r"""Do pre-optimized LiDB weights carry their identity? Measured with the recognizer.

    python -m train.eval_preopt --config configs/preopt_mini.py \
        --weights assets/mini_preopt/weights --out docs/mini_preopt_identity.json

For `--identities` identities spread evenly over the weights dataset, samples
`--per_identity` images of the training prompt ("a sks face") twice, with the same noise:
with the base alone and with the identity's LiDB weights merged. The recognizer reads the
8 identity attributes of every sample; identity accuracy is the fraction that match the
identity's true attributes (the renderer's ground truth). The base alone scores what a
random face scores; pre-optimized weights should score well above it. Writes the JSON
and a PNG beside it (a row per identity, first 12: its reference photo, the base's
samples, the LiDB samples).
"""

import json
import os
import sys

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import data, dreambooth, files, lidb, logs, models, weights_dataset
from hdb_jax import params as params_lib
from hdb_jax.mini import dataset, render
from hdb_jax.mini import recognizer as recognizer_lib

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWN_IDENTITIES = 12  # rows of the PNG


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Pre-optimization config (its model, "
                                  "prompt and dataset).")
  flags.DEFINE_string("weights", None, "Weights dataset folder (<workdir>/weights).")
  flags.DEFINE_string("out", None, "Metrics JSON to write (a PNG grid goes beside it).")
  flags.DEFINE_integer("identities", 48, "Identities to sample, spread over the dataset.")
  flags.DEFINE_integer("per_identity", 4, "Samples per identity and model.")
  flags.DEFINE_integer("num_steps", 25, "DDIM steps.")
  flags.DEFINE_float("guidance_scale", 4.0, "Classifier-free guidance scale.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (identity i uses fold_in(seed, i)).")
  flags.mark_flags_as_required(["config", "weights", "out"])


def reference_photos(config, identities) -> dict[int, np.ndarray]:
  """The first record (a photo) of each identity in the pre-optimization dataset."""
  records = dataset.source(config.data.config, config.data.split, config.data.data_dir or None)
  wanted = set(int(i) for i in identities)
  starts = {identity: start for identity, start, _ in data.identity_ranges(records)
            if identity in wanted}
  return {identity: records[start]["image"] for identity, start in starts.items()}


def run(config, weights_dir: str, num_identities: int, per_identity: int, num_steps: int,
        guidance_scale: float, seed: int) -> tuple[dict, np.ndarray]:
  """-> (metrics, grid images [num_identities * (1 + 2 * per_identity), H, W, 3] in [-1, 1])."""
  dataset = weights_dataset.open_dataset(weights_dir)
  sd, frozen = models.load_or_build(config.model)
  base_fingerprint = params_lib.fingerprint(frozen, dataset.spec.layers)
  trained_on = dataset.metadata.get("base_fingerprint", base_fingerprint)
  if trained_on != base_fingerprint:
    raise ValueError(f"{weights_dir}: weights were pre-optimized on base {trained_on}, "
                     f"config.model ({config.model.path or 'random init'}) is {base_fingerprint}")
  aux = lidb.make_aux(dataset.spec)
  picks = np.linspace(0, len(dataset) - 1, min(num_identities, len(dataset))).round()
  identities = dataset.identities[picks.astype(int)]
  photos = reference_photos(config, identities) if config.data.source == "synthetic_faces" else {}

  prompt = config.prompt.format(token=config.token, class_name=config.class_name)
  cond = np.repeat(sd.tokenize([prompt]), per_identity, 0)
  uncond = np.repeat(sd.tokenize([""]), per_identity, 0)
  generate = dreambooth.make_generate(sd, num_steps)
  rec = recognizer_lib.load()
  rows, base_acc, lidb_acc, lidb_valid = [], [], [], []
  for i, identity in enumerate(tqdm(identities, desc="identities", unit="id")):
    key = jax.random.fold_in(jax.random.key(seed), i)
    base = np.asarray(generate(frozen, None, None, cond, uncond, key, guidance_scale))
    personal = np.asarray(generate(frozen, dataset.get(int(identity)), aux, cond, uncond,
                                   key, guidance_scale))
    truth = render.identity_attributes(int(identity))
    base_acc.append(recognizer_lib.identity_accuracy(rec(base), truth).mean())
    pred = rec(personal)
    lidb_acc.append(recognizer_lib.identity_accuracy(pred, truth).mean())
    lidb_valid.append(recognizer_lib.face_validity(pred).mean())
    photo = photos.get(int(identity))
    photo = (np.zeros_like(base[:1]) if photo is None
             else photo[None].astype(np.float32) / 127.5 - 1.0)
    rows.append(np.concatenate([photo, base, personal]))

  base_acc, lidb_acc = np.array(base_acc), np.array(lidb_acc)
  metrics = {
      "num_identities": len(identities), "samples_per_identity": per_identity,
      "prompt": prompt, "num_steps": num_steps, "guidance_scale": guidance_scale,
      "seed": seed, "base_fingerprint": base_fingerprint,
      "identity_accuracy_base": float(base_acc.mean()),
      "identity_accuracy_preoptimized": float(lidb_acc.mean()),
      "fraction_identities_improved": float((lidb_acc > base_acc).mean()),
      "face_validity_preoptimized": float(np.mean(lidb_valid)),
      "per_identity": [{"identity": int(i), "base": float(b), "preoptimized": float(p)}
                       for i, b, p in zip(identities, base_acc, lidb_acc)],
  }
  return metrics, np.concatenate(rows)


def main(argv):
  del argv
  logs.quiet_libraries()
  metrics, grid = run(FLAGS.config, FLAGS.weights, FLAGS.identities, FLAGS.per_identity,
                      FLAGS.num_steps, FLAGS.guidance_scale, FLAGS.seed)
  metrics["command"] = "python -m train.eval_preopt " + files.portable_command(sys.argv[1:],
                                                                                REPO)
  files.write_json(FLAGS.out, metrics)
  png = os.path.splitext(FLAGS.out)[0] + ".png"
  shown = min(SHOWN_IDENTITIES, metrics["num_identities"])
  files.save_grid(grid[:shown * (1 + 2 * FLAGS.per_identity)], png, rows=shown, upscale=2)
  logging.info("wrote %s and %s", FLAGS.out, png)
  print(json.dumps({k: v for k, v in metrics.items() if k != "per_identity"}, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
