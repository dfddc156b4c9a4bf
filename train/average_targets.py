r"""Averaged hypernetwork targets: the mean of the same identities pre-optimized with
several seeds (docs/hypernet.md "How much of a target is noise": half of each target is
training noise; the mean of two runs keeps the identity and halves that noise).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.preoptimize \
        --config configs/preopt_mini.py --workdir workdir/preopt_seed1 \
        --config.data.max_identities=1200 --config.preopt.seed=1 --config.preopt.init_seed=0
    python -m train.average_targets --weights assets/mini_preopt/weights,workdir/preopt_seed1/weights \
        --out workdir/preopt_mean/weights

Every run must start from the same D_train (`preopt.init_seed` fixed: the committed runs
use a shared start, seed 0), hold the same identities and come from the same base;
otherwise it refuses, naming the folders. Train on the result with
`python -m train.train_hypernet ... --config.data.weights=workdir/preopt_mean/weights`.
"""

import sys

from absl import app, flags

from hdb_jax import logs, weights_dataset

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list("weights", None, "Two or more weights dataset folders (comma-separated).")
  flags.DEFINE_string("out", None, "Folder of the averaged weights dataset (must not hold one).")
  flags.mark_flags_as_required(["weights", "out"])


def main(argv):
  del argv
  logs.quiet_libraries()
  try:
    index = weights_dataset.write_mean(FLAGS.out, FLAGS.weights)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{FLAGS.out}: the mean of {len(FLAGS.weights)} runs, "
        f"{index['num_identities']} identities")


if __name__ == "__main__":
  define_flags()
  app.run(main)
