"""Summarizing personalizations: per-identity results on disk, the table's statistics.

`train/evaluate.py` personalizes M held-out identities with every method of the config,
samples P prompts x S seeds of each (all methods on the same noise) and scores every
sample here. Results go to one JSON-lines file per method, one line per identity, so a
run resumes per (method, identity) and the table can be recomputed from the raw scores.

Scores (in the mini world its recognizer's, `train/evaluate.py: score_identity`), per sample:
  identity     fraction of the subject's attributes the recognizer sees (our Face Rec)
  background   the named background is there (1/0; NaN where the prompt names none)
  style        the named style is there (1/0; NaN where none is named)
  valid        the recognizer sees a face
and per (identity, prompt): diversity, the mean absolute pixel difference between the
seeds' samples (in [0, 2]). The class prompt ("a face", no identifier) is scored apart:
`class_identity`, how much its samples look like the subject (the base: chance; a
method that leaks the subject into its class raises it).
"""

from __future__ import annotations

import json
import os

import numpy as np

METRICS = ("identity_plain", "identity", "background", "style", "valid", "diversity",
           "class_identity")


def identity_means(line: dict, seeds: int) -> dict:
  """One identity's result line -> its mean of every metric (None where nothing scored).
  The plain prompt is `prompts[0]`: the first `seeds` samples."""
  mean = lambda xs: float(np.mean(xs)) if xs else None
  scored = lambda name: [x for x in line["scores"][name] if x is not None]
  out = {name: mean(scored(name)) for name in ("identity", "background", "style", "valid",
                                               "diversity", "class_identity")}
  out["identity_plain"] = mean(line["scores"]["identity"][:seeds])
  return out


def bootstrap_ci(values, samples: int = 1000, seed: int = 0) -> list[float] | None:
  """95% bootstrap interval of the mean of `values` (one per identity)."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  if len(values) < 2:
    return None
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, len(values), (samples, len(values)))].mean(1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(lines: list[dict], seeds: int) -> dict:
  """A method's result lines -> mean and 95% CI of every metric over identities, and the
  seconds per personalization (median, mean)."""
  per_identity = [identity_means(line, seeds) for line in lines]
  out = {"identities": len(lines)}
  for name in METRICS:
    values = [m[name] for m in per_identity if m[name] is not None]
    out[name] = float(np.mean(values)) if values else None
    out[name + "_ci95"] = bootstrap_ci(values)
  seconds = [line["seconds"] for line in lines if line.get("seconds") is not None]
  out["seconds_median"] = float(np.median(seconds)) if seconds else None
  out["seconds_mean"] = float(np.mean(seconds)) if seconds else None
  return out


def paired_difference(lines: list[dict], reference: list[dict], seeds: int,
                      metric: str) -> dict | None:
  """Mean over identities of (this method - the reference method) on `metric`, with its
  95% bootstrap interval, on the identities both have: the same identities and noise,
  so the interval is far tighter than the two rows' own."""
  mine = {line["identity"]: identity_means(line, seeds)[metric] for line in lines}
  theirs = {line["identity"]: identity_means(line, seeds)[metric] for line in reference}
  shared = [i for i in mine if i in theirs and mine[i] is not None and theirs[i] is not None]
  if not shared:
    return None
  differences = [mine[i] - theirs[i] for i in shared]
  return {"mean": float(np.mean(differences)), "ci95": bootstrap_ci(differences),
          "identities": len(shared)}


class ResultsFile:
  """One method's results: a JSON-lines file, one line per identity, extended per chunk
  by rewriting it to a temporary file renamed into place (a kill leaves the old file)."""

  def __init__(self, folder: str, method: str):
    self.path = os.path.join(folder, f"{method}.jsonl")

  def read(self) -> list[dict]:
    try:
      with open(self.path) as f:
        return [json.loads(text) for text in f if text.strip()]
    except FileNotFoundError:
      return []

  def done(self) -> set[int]:
    return {int(line["identity"]) for line in self.read()}

  def append(self, lines: list[dict]) -> None:
    whole = self.read()
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for line in whole + list(lines):
        f.write(json.dumps(line, sort_keys=True) + "\n")
    os.replace(tmp, self.path)
