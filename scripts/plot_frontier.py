r"""The identity-context-time frontier of the mini world: one figure from committed files.

    python scripts/plot_frontier.py --out docs/mini_frontier/frontier.png

Rows come from the comparison table (docs/mini_results.json), the frontier
(docs/mini_frontier/summary.json) and the levers (docs/mini_levers/summary.json, when
present); seconds from one benchmark run (benchmarks/results/method_seconds.json), never
from the harness's own timings (they were measured at different times on a shared CPU).
Left: identity (all identifier prompts) against context (mean of background and style
accuracy), each method family a curve through its step counts. Right: identity against
seconds per personalization (log scale). Error bars: 95% bootstrap intervals over the
held-out identities. Rows missing from the files are left out.
"""

import json
import os
import re

from absl import app, flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("docs/mini_results.json", "docs/mini_frontier/summary.json",
           "docs/mini_levers/summary.json")
SECONDS = "benchmarks/results/method_seconds.json"
# Curves: a family's methods by steps. The table's rows are the 400-step (40 for the full
# method) points; `full` is the full method at the config's 40 steps.
FAMILIES = {
    "full method (hypernetwork + fast finetuning)": (r"full(?:_(\d+))?$", 40),
    "full method, rank 16 in the LiDB subspace (levers; the default at 120)":
        (r"full_lidb(?:_(\d+))?_rank16$", 40),
    "LoRA DreamBooth (rank 4)": (r"lora_dreambooth_(\d+)$", None),
    "LiDB DreamBooth (rank 1)": (r"lidb_dreambooth_(\d+)$", None),
    "DreamBooth (whole UNet, prior)": (r"dreambooth_(\d+)$", None),
}
POINTS = ("base", "hypernet_only", "no_hypernet")

flags.DEFINE_string("out", "docs/mini_frontier/frontier.png", "PNG to write.")
FLAGS = flags.FLAGS


def load_rows() -> dict:
  rows = {}
  for path in SOURCES:
    full = os.path.join(REPO, path)
    if os.path.exists(full):
      with open(full) as f:
        rows.update(json.load(f)["table"])
  return rows


def context(row) -> float:
  return (row["background"] + row["style"]) / 2


def family_curves(rows) -> dict:
  """{family: [(steps, name)] sorted by steps}."""
  curves = {}
  for family, (pattern, default_steps) in FAMILIES.items():
    points = []
    for name in rows:
      match = re.match(pattern, name)
      if match:
        points.append((int(match.group(1)) if match.group(1) else default_steps, name))
    if points:
      curves[family] = sorted(points)
  return curves


def main(argv):
  del argv
  rows = load_rows()
  seconds_path = os.path.join(REPO, SECONDS)
  seconds = {}
  if os.path.exists(seconds_path):
    with open(seconds_path) as f:
      seconds = {k: v["seconds"] for k, v in json.load(f)["methods"].items()}
  curves = family_curves(rows)
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))

  def draw(axis, x_of, names, label, style):
    names = [n for n in names if x_of(n) is not None]
    if not names:
      return
    xs = [x_of(n) for n in names]
    ys = [rows[n]["identity"] for n in names]
    lows = [rows[n]["identity"] - rows[n]["identity_ci95"][0] for n in names]
    highs = [rows[n]["identity_ci95"][1] - rows[n]["identity"] for n in names]
    axis.errorbar(xs, ys, yerr=[lows, highs], fmt=style, capsize=2, label=label)
    for x, y, n in zip(xs, ys, names):
      axis.annotate(n, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)

  for family, points in curves.items():
    names = [n for _, n in points]
    draw(left, lambda n: context(rows[n]), names, family, "o-")
    draw(right, lambda n: seconds.get(n) or None, names, family, "o-")
  singles = [n for n in POINTS if n in rows]
  draw(left, lambda n: context(rows[n]), singles, "single rows", "ks")
  draw(right, lambda n: seconds.get(n) or None, [n for n in singles if n != "base"],
       "single rows", "ks")
  base = rows.get("base")
  if base:
    for axis in (left, right):
      axis.axhline(base["identity"], color="gray", lw=0.8, ls=":")
    left.axvline(context(base) - 0.02, color="gray", lw=0.8, ls="--")
    left.annotate("base - 2 points", (context(base) - 0.02, base["identity"]), fontsize=7,
                  rotation=90, xytext=(-9, 4), textcoords="offset points")
  left.set_xlabel("context accuracy (mean of background and style; identifier prompts)")
  left.set_ylabel("identity accuracy (all identifier prompts)")
  left.set_title("identity against context (50 held-out identities, 95% CI)")
  right.set_xscale("log")
  right.set_xlabel("seconds per personalization (one benchmark run, 2-core CPU)")
  right.set_title("identity against seconds")
  left.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  from hdb_jax import files  # atomic write
  with files.atomic_path(os.path.join(REPO, FLAGS.out)) as tmp:
    fig.savefig(tmp, dpi=110, format="png")


if __name__ == "__main__":
  app.run(main)
