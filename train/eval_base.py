r"""Measure a mini-world base model with the recognizer (issue "Mini world", item 6).

    python -m train.eval_base --config configs/mini.py --out docs/mini_base_metrics.json

Samples `--per_group` images (default 256) for each prompt group of
hdb_jax/mini/base_eval.py (without identifier, with the pretrained identifier "sks", with a
control word never seen in pretraining) with fixed seeds, prints and writes the metrics
as JSON (strict: NaN is null; paths relative to the repo), and a grid of the first 16
samples of each group beside it (<out>.png, a row per group). Exit code 1 when a target
is missed.
"""

import json
import os
import sys

from absl import app, flags, logging
import numpy as np
from ml_collections import config_flags

from hdb_jax import files, logs, models
from hdb_jax.mini import base_eval

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/mini.py).")
  flags.DEFINE_string("out", None, "Metrics JSON to write (a PNG grid goes beside it).")
  flags.DEFINE_integer("per_group", 256, "Samples per prompt group.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  logs.quiet_libraries()
  config = FLAGS.config
  sd, params = models.load_or_build(config.model)
  result, samples = base_eval.evaluate(
      sd, params, per_group=FLAGS.per_group, seed=FLAGS.seed,
      num_steps=config.pretrain.sample_steps, guidance_scale=config.pretrain.guidance_scale)
  result["model"] = (files.portable_path(config.model.path, REPO) if config.model.path
                     else "built from config (random init)")
  result["command"] = "python -m train.eval_base " + files.portable_command(sys.argv[1:], REPO)
  result["targets"] = base_eval.TARGETS
  files.write_json(FLAGS.out, result)
  grid = np.concatenate([images[:16] for images in samples.values()])
  files.save_grid(grid, os.path.splitext(FLAGS.out)[0] + ".png", rows=len(samples), upscale=2)
  print(json.dumps(files.json_safe(result["summary"]), indent=2))
  if not result["summary"]["passes"]:
    logging.error("the base model misses a target: %s", result["summary"])
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
