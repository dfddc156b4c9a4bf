r"""How much of the pre-optimized weights is identity? A linear probe on the mini world.

    python -m train.analyze_targets --weights assets/mini_preopt/weights \
        --out docs/mini_preopt_targets.json

The hypernetwork's weight-space loss can only teach what the photo predicts. This fits
ridge regressions from (a) the identity's true attributes (the renderer's ground truth,
one-hot) and (b) the reference photo's pixels to the pre-optimized LiDB values (the train
values, and the residuals D_train @ U_train), on the first `--fit` identities, and reports
the variance explained (R^2) on the rest. Also: the values' mean square, their variance
across identities (what a weight loss that predicts only the mean scores), and the
fraction of that variance in the top principal directions.

With `--repeat OTHER_WEIGHTS` (the same identities pre-optimized again with another
`preopt.seed` and the same `preopt.init_seed`: the same start, other training noise), it
reports how repeatable the values are instead: the correlation across identities between
the two runs, i.e. the fraction of the variance across identities that is not training
noise (what any predictor from the photo can hope to learn). Fewer identities do (64 is
plenty), so the variants of the pre-optimization can be compared before a long run:

    python -m train.analyze_targets --weights A/weights --repeat B/weights --out rep.json
"""

import json
import os
import sys

from absl import app, flags
import jax
import numpy as np

from hdb_jax import data, files, logs, weights_dataset
from hdb_jax.mini import dataset, render

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  flags.DEFINE_string("weights", None, "Weights dataset folder (a pre-optimization's).")
  flags.DEFINE_string("out", None, "Metrics JSON to write.")
  flags.DEFINE_integer("fit", 1000, "Identities to fit on; the rest are held out.")
  flags.DEFINE_list("ridge", ["1", "10", "100"], "Ridge strengths tried (best reported).")
  flags.DEFINE_string("repeat", None, "Weights of the same identities from another noise "
                      "seed: report the repeatable fraction instead of the probes.")
  flags.mark_flags_as_required(["weights", "out"])


def held_out_r2(features, targets, fit: int, strengths) -> float:
  """Best held-out R^2 over ridge strengths of targets [N, T] ~ features [N, F]."""
  x = features - features[:fit].mean(0)
  y = targets - targets[:fit].mean(0)
  best = -np.inf
  for strength in strengths:
    weights = np.linalg.solve(x[:fit].T @ x[:fit] + strength * np.eye(x.shape[1]),
                              x[:fit].T @ y[:fit])
    residual = ((x[fit:] @ weights - y[fit:]) ** 2).mean()
    best = max(best, 1.0 - residual / (y[fit:] ** 2).mean())
  return float(best)


def flat_values(targets) -> np.ndarray:
  """The train values of every identity, flattened: [N, T], ordered by identity."""
  order = np.argsort(np.asarray(targets.identities))
  return np.concatenate([np.asarray(x).reshape(len(targets), -1)[order]
                         for x in jax.tree_util.tree_leaves(targets.train)], 1)


def repeatable_share(first: np.ndarray, second: np.ndarray) -> float:
  """Values [N, T] of the same N identities from two runs -> the share of the variance
  across identities that both runs have (their covariance over the geometric mean of
  their variances): 1 for identical runs, ~0 for independent noise."""
  a, b = first - first.mean(0), second - second.mean(0)
  return float((a * b).mean() / np.sqrt((a ** 2).mean() * (b ** 2).mean()))


def repeatability(weights_dir: str, other_dir: str) -> dict:
  """How much of the variance across identities two noise seeds agree on."""
  first, second = (weights_dataset.open_dataset(d) for d in (weights_dir, other_dir))
  if sorted(np.asarray(first.identities).tolist()) != sorted(
      np.asarray(second.identities).tolist()):
    raise ValueError(f"{weights_dir} and {other_dir} hold different identities")
  a, b = flat_values(first), flat_values(second)
  return {
      "identities": len(first),
      "variance_across_identities": [float(a.var(0).mean()), float(b.var(0).mean())],
      "repeatable_fraction": repeatable_share(a, b),
      "mean_square_difference": float(((a - a.mean(0) - b + b.mean(0)) ** 2).mean()),
  }


def run(weights_dir: str, fit: int, strengths) -> dict:
  targets = weights_dataset.open_dataset(weights_dir)
  count = len(targets)
  if not 0 < fit < count:
    raise ValueError(f"--fit must be in 1..{count - 1} ({count} identities in {weights_dir})")
  values = np.concatenate([np.asarray(x).reshape(count, -1)
                           for x in jax.tree_util.tree_leaves(targets.train)], 1)
  residuals = np.concatenate([
      np.einsum("nar,nrb->nab", np.asarray(w["D_train"]), np.asarray(w["U_train"])).reshape(
          count, -1)
      for layers in targets.train.values() for w in layers.values()], 1)
  attributes = render.identity_attributes(np.asarray(targets.identities))   # [N, A]
  one_hot = np.concatenate([np.eye(attributes[:, k].max() + 1)[attributes[:, k]]
                            for k in range(attributes.shape[1])], 1)
  made_from = json.loads(targets.metadata.get("data", "{}"))
  if made_from.get("source", "synthetic_faces") != "synthetic_faces":
    raise ValueError(f"{weights_dir}: made from {made_from['source']}; this probe needs the "
                     "mini world's synthetic_faces (their true attributes)")
  records = dataset.source(made_from.get("config", "default"), made_from.get("split", "train"),
                           made_from.get("data_dir") or None)
  starts = {identity: start for identity, start, _ in data.identity_ranges(records)}
  pixels = np.stack([records[starts[int(i)]]["image"] for i in targets.identities]).reshape(
      count, -1).astype(np.float64) / 255.0
  centered = values - values.mean(0)
  singular = np.linalg.svd(centered, compute_uv=False) ** 2
  return {
      "identities": count, "fit": fit, "held_out": count - fit,
      "values": values.shape[1],
      "mean_square": float((values ** 2).mean()),
      "variance_across_identities": float((centered ** 2).mean()),
      "variance_fraction_top_directions": {
          str(k): float(singular[:k].sum() / singular.sum()) for k in (1, 5, 20, 100)},
      "held_out_r2": {
          "values_from_attributes": held_out_r2(one_hot, values, fit, strengths),
          "residuals_from_attributes": held_out_r2(one_hot, residuals, fit, strengths),
          "values_from_pixels": held_out_r2(pixels, values, fit, strengths)},
  }


def main(argv):
  del argv
  logs.quiet_libraries()
  if FLAGS.repeat:
    metrics = repeatability(FLAGS.weights, FLAGS.repeat)
  else:
    metrics = run(FLAGS.weights, FLAGS.fit, [float(s) for s in FLAGS.ridge])
  metrics["command"] = "python -m train.analyze_targets " + files.portable_command(
      sys.argv[1:], REPO)
  files.write_json(FLAGS.out, metrics)
  print(metrics)


if __name__ == "__main__":
  define_flags()
  app.run(main)
