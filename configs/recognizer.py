"""Recognizer of the mini world (hdb_jax/mini/recognizer.py), trained on renderer ground truth.

Trains in ~15 minutes on a 2-core CPU and writes <workdir>/recognizer/ (weights +
recognizer.json with the held-out accuracy of every head). The committed weights in
assets/recognizer were made with:

    python -m train.train_recognizer --config configs/recognizer.py \
        --workdir workdir/recognizer --config.out=assets/recognizer

Rerunning the same command resumes from <workdir>/checkpoints.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Conv widths per stage (after 2x2 space-to-depth: 16x16, 8x8, 4x4), dense width.
  config.model = dict(widths=((32, 32), (64, 64), (128,)), hidden=128)

  # Training images come from a pool of renders (random identities outside the holdout
  # split, random views; `negative_fraction` non-faces) of which `fresh_per_step` are
  # re-rendered every step: rendering costs about as much as a train step.
  config.train = dict(steps=2500, batch_size=128, learning_rate=2e-3, warmup_steps=100,
                      pool_size=16384, fresh_per_step=32, negative_fraction=0.25, seed=0,
                      log_every=50, checkpoint_every=500)

  # Held-out renders: the holdout identities of synthetic_faces/default (never trained
  # on), `images_per_identity` new views each, plus `num_negatives` non-faces.
  config.eval = dict(dataset_config="default", images_per_identity=4, num_negatives=512,
                     seed=1000)

  config.out = ""  # output folder; empty: <workdir>/recognizer
  return config
