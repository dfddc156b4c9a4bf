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

Scores on real photos (SD1.5; `reference_scores`, `config.scoring = "reference"`), per
sample of the identifier prompts, against the identity's reference photo:
  face         Face Rec: 1 - dlib's face descriptor distance (faces.py; None: no face)
  face_found   dlib finds a face in the sample (1/0)
  clip_i       CLIP-I: cosine similarity of CLIP image embeddings (metrics.py)
  clip_t       CLIP-T: sample against its prompt without the identifier
  dino         DINO: cosine similarity of DINO ViT CLS embeddings
and the same diversity; the class prompt's `class_face` and `class_dino` (DreamBooth's
PRES: how much the class drifts to the subject). `face_plain` is `face` on `prompts[0]`.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

METRICS = ("identity_plain", "identity", "background", "style", "valid", "diversity",
           "class_identity")
REFERENCE_METRICS = ("face_plain", "face", "face_found", "clip_i", "clip_t", "dino",
                     "diversity", "class_face", "class_dino")
PLAIN = {"identity": "identity_plain", "face": "face_plain"}  # per sample -> on prompts[0]
# Per scoring (train/evaluate.py: config.scoring): the table's columns (key, header, with
# its CI), the text table's (key, label, width), the metrics paired against the reference
# method, the identity metric whose gain over the base is reported, and the context
# metrics whose drop is.
SCORINGS = {
    "recognizer": dict(
        columns=(("identity_plain", "identity, plain prompt", True),
                 ("identity", "identity, all identifier prompts", True),
                 ("background", "background", True), ("style", "style", True),
                 ("valid", "face validity", False),
                 ("class_identity", "class prompt looks like the subject", True),
                 ("diversity", "diversity", False)),
        text=(("identity_plain", "id plain", 9), ("identity", "id all", 7),
              ("background", "bg", 6), ("style", "style", 6), ("valid", "valid", 6),
              ("class_identity", "class id", 8)),
        paired=("identity_plain", "identity", "background", "style"),
        gain="identity_plain", context=("background", "style")),
    "reference": dict(
        columns=(("face_plain", "Face Rec, plain prompt", True),
                 ("face", "Face Rec, all identifier prompts", True),
                 ("face_found", "face found", False), ("clip_i", "CLIP-I", True),
                 ("clip_t", "CLIP-T", True), ("dino", "DINO", True),
                 ("class_face", "class prompt: Face Rec", True),
                 ("class_dino", "class prompt: DINO", True),
                 ("diversity", "diversity", False)),
        text=(("face_plain", "face plain", 10), ("face", "face all", 8),
              ("face_found", "found", 6), ("clip_i", "clip-i", 6), ("clip_t", "clip-t", 6),
              ("dino", "dino", 6), ("class_dino", "class dino", 10)),
        paired=("face_plain", "face", "clip_i", "clip_t", "dino"),
        gain="face_plain", context=("clip_t",)),
}


def scoring_of(row: dict) -> str:
  """The scoring a summary row (or an identity's means) came from, by its metrics."""
  return "recognizer" if "identity" in row else "reference"


def identity_means(line: dict, seeds: int) -> dict:
  """One identity's result line -> its mean of every metric it has (None where nothing
  scored), and of `PLAIN`'s on the plain prompt `prompts[0]`: the first `seeds` samples."""
  mean = lambda xs: float(np.mean(xs)) if xs else None
  scored = lambda values: [x for x in values if x is not None]
  scores = line["scores"]
  out = {name: mean(scored(values)) for name, values in scores.items()}
  for name, plain in PLAIN.items():
    if name in scores:
      out[plain] = mean(scored(scores[name][:seeds]))
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
  present = {name for m in per_identity for name in m}
  known = [n for n in (METRICS if "identity" in present else REFERENCE_METRICS) if n in present]
  for name in dict.fromkeys(known + sorted(present - set(known))):
    values = [m.get(name) for m in per_identity if m.get(name) is not None]
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
  mine = {line["identity"]: identity_means(line, seeds).get(metric) for line in lines}
  theirs = {line["identity"]: identity_means(line, seeds).get(metric) for line in reference}
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


def seed_diversity(images, prompts: int, seeds: int) -> np.ndarray:
  """Samples [prompts * seeds, H, W, 3] in [-1, 1] (prompt-major) -> per prompt [prompts],
  the mean absolute pixel difference over pairs of its seeds' samples (0 for one seed)."""
  grouped = np.asarray(images, np.float32).reshape((prompts, seeds, -1))
  return (np.abs(grouped[:, :, None] - grouped[:, None, :]).mean(-1).sum((1, 2))
          / max(seeds * (seeds - 1), 1))


def _listed(values) -> list:
  """Floats for a JSON line; NaN -> None."""
  return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, np.float64)]


def reference_scores(encoders, reference, images, prompts: list[str], seeds: int,
                     identifier: str) -> dict:
  """One identity's result line on real photos. reference: its photo, uint8 [H, W, 3];
  images: its samples [(P + 1) * S, H', W', 3] in [-1, 1], prompt-major: the P identifier
  `prompts`, then the class prompt, S = `seeds` each. Scores as in this module's
  docstring; `encoders`: `metrics.Encoders` (an encoder left out: its scores absent)."""
  from hdb_jax import faces, metrics
  images = np.asarray(images, np.float32)
  n = len(prompts) * seeds
  if len(images) != n + seeds:
    raise ValueError(f"reference_scores: {len(images)} samples, expected "
                     f"({len(prompts)} + 1) x {seeds}")
  pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  anchor = faces.descriptor(np.asarray(reference, np.uint8))
  if anchor is None:  # nothing to compare with; whether samples show a face still counts
    logging.warning("reference_scores: no face in the reference photo; no Face Rec scores")
  own = [faces.descriptor(p) for p in pixels]
  found = np.array([d is not None for d in own], np.float32)
  face = np.array([np.nan if d is None or anchor is None else 1.0 - np.linalg.norm(d - anchor)
                   for d in own], np.float32)  # as faces.identity_similarity
  scores = {"face": _listed(face[:n]), "face_found": _listed(found[:n]),
            "class_face": _listed(face[n:]),
            "diversity": seed_diversity(images[:n], len(prompts), seeds).tolist()}
  if encoders.clip is not None:
    scores["clip_i"] = _listed(metrics.clip_image_similarity(encoders, reference, images[:n]))
    chosen = [p for p in prompts for _ in range(seeds)]
    scores["clip_t"] = _listed(metrics.clip_text_similarity(encoders, images[:n], chosen,
                                                            identifier))
  if encoders.dino is not None:
    dino = metrics.dino_similarity(encoders, reference, images)
    scores["dino"], scores["class_dino"] = _listed(dino[:n]), _listed(dino[n:])
  return scores
