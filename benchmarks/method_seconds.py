r"""Seconds per personalization of every method in the mini world's table, frontier and
levers, measured in one process under one load: the time axis of docs/results.md.

    python benchmarks/method_seconds.py --out benchmarks/results/method_seconds.json

The comparison harness (train/evaluate.py) times each identity's personalization while it
also samples and scores, and its rows were run at different times on a shared CPU, so its
seconds do not compare across rows. Here every method's trainer (the harness's own,
train/evaluate_methods.make_trainer) is built in this process and timed on the same
held-out photos, one method after the other. A method's time is affine in its steps,
`seconds = fixed + per_step * steps`: methods that differ only in their steps share one
fit, measured at two step counts (median of `--repeats` photos each, after one untimed
call that compiles). Methods without steps (hypernetwork only, the base) are timed as
they are. The load average before and after is recorded: a quiet machine is the point.

Methods added to the configs later that differ from a timed one only in their steps take
their seconds from that run's stored fit, without timing anything (no second load mixed
in); a method with a new fit needs a whole new run:

    python benchmarks/method_seconds.py --out benchmarks/results/method_seconds.json --extend
"""

import copy
import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hdb_jax import config_file, dreambooth, files, logs, models, personalize  # noqa: E402
from train import evaluate_methods  # noqa: E402

flags.DEFINE_string("out", None, "JSON file to write.")
flags.DEFINE_list("configs", ["configs/evaluate_mini.py", "configs/evaluate_frontier.py",
                              "configs/evaluate_levers.py",
                              "configs/evaluate_hypernet_levers.py"],
                  "Evaluation configs whose methods are timed (same base and photos).")
flags.DEFINE_list("fit_steps", ["10", "40"], "The two step counts of each fit.")
flags.DEFINE_integer("repeats", 3, "Photos timed per step count (median).")
flags.DEFINE_list("methods", [], "Only these methods (default: all of the configs').")
flags.DEFINE_string("cache_dir", None, "hdb personalize's program cache (default its own).")
flags.DEFINE_list("same_as", [], "With --extend: name=timed, a method whose trainer is the "
                  "timed method's but for a file of the same architecture (e.g. another "
                  "hypernetwork of the same config): its seconds are that method's.")
flags.DEFINE_bool("extend", False, "Add the configs' untimed methods to --out from its "
                  "stored fits (same settings but steps); refuse those that need timing.")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def fit_key(method) -> str:
  """Methods with the same key differ only in their steps (paths relative to the repo)."""
  settings = {k: files.portable_path(v, REPO) if isinstance(v, str) and os.path.isabs(v)
              else v for k, v in method.to_dict().items() if k != "steps"}
  return json.dumps(settings, sort_keys=True)


def time_trainer(train, photos) -> float:
  """Median seconds of `train` over photos[1:], after an untimed call on photos[0]."""
  train(photos[0])
  seconds = []
  for photo in photos[1:]:
    began = time.perf_counter()
    train(photo)
    seconds.append(time.perf_counter() - began)
  return statistics.median(seconds)


def main(argv):
  del argv
  logs.quiet_libraries()
  configs = [config_file.load(os.path.join(REPO, path)) for path in FLAGS.configs]
  config = configs[0]
  methods = {name: method for c in configs for name, method in c.methods.items()
             if not FLAGS.methods or name in FLAGS.methods}
  if FLAGS.extend:
    return extend(FLAGS.out, methods, config)
  cache = personalize.cache_dirs(FLAGS.cache_dir)
  sd, frozen = models.load_or_build(config.model)
  _, photos = evaluate_methods.held_out(config, sd.image_size)
  photos = [p.astype(np.float32) / 127.5 - 1.0 for p in photos[:FLAGS.repeats + 1]]
  generate_base = dreambooth.make_generate(sd, config.sample_steps)
  load_before = os.getloadavg()

  def seconds_at(method, steps=None):
    method = copy.deepcopy(method)
    if steps is not None:
      method.steps = steps
    train = evaluate_methods.make_trainer(config, "timed", method, sd, frozen,
                                          generate_base, cache)
    return time_trainer(train, photos)

  low, high = (int(s) for s in FLAGS.fit_steps)
  fits, rows = {}, {}
  for name, method in methods.items():
    if method.kind == "base":
      rows[name] = {"seconds": 0.0, "steps": 0, "fit": None}
      continue
    steps = method.get("steps", None)
    if method.kind == "personalize" and steps is None:
      steps = config.personalize.steps
    if not steps:  # hypernetwork only: nothing to fit
      rows[name] = {"seconds": seconds_at(method), "steps": 0, "fit": None}
    else:
      key = fit_key(method)
      if key not in fits:
        at_low, at_high = seconds_at(method, low), seconds_at(method, high)
        per_step = (at_high - at_low) / (high - low)
        fits[key] = {"settings": json.loads(key), "per_step": per_step,
                     "fixed": at_low - per_step * low, "measured": {low: at_low,
                                                                   high: at_high}}
      fit = fits[key]
      rows[name] = {"seconds": fit["fixed"] + fit["per_step"] * steps, "steps": steps,
                    "fit": key}
    print(f"{name:32s} {rows[name]['seconds']:8.2f} s", flush=True)
  result = {
      "command": "python benchmarks/method_seconds.py " + " ".join(  # not the cache's path
          a for a in sys.argv[1:] if not a.startswith("--cache_dir")),
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
      "fit_steps": [low, high], "repeats": FLAGS.repeats,
      "fits": list(fits.values()),
      "methods": {name: {k: v for k, v in row.items() if k != "fit"} for name, row
                  in rows.items()},
  }
  files.write_json(FLAGS.out, result)


def extend(path: str, methods, config) -> None:
  """Rows for the methods missing from `path`, each from the stored fit of its settings."""
  with open(path) as f:
    result = json.load(f)
  fits = {json.dumps(fit["settings"], sort_keys=True): fit for fit in result["fits"]}
  same_as = dict(pair.split("=", 1) for pair in FLAGS.same_as)
  added = {}
  for name, method in methods.items():
    if name in result["methods"]:
      continue
    if name in same_as:  # the same work as a timed method, by the user's word
      added[name] = dict(result["methods"][same_as[name]], same_as=same_as[name])
      print(f"{name:32s} {added[name]['seconds']:8.2f} s (as {same_as[name]})", flush=True)
      continue
    fit = fits.get(fit_key(method))
    steps = method.get("steps", None) or (config.personalize.steps
                                          if method.kind == "personalize" else None)
    if fit is None or not steps:
      raise ValueError(f"{name}: no stored fit in {path} has its settings; time every "
                       "method again in one run (without --extend)")
    added[name] = {"seconds": fit["fixed"] + fit["per_step"] * steps, "steps": steps}
    print(f"{name:32s} {added[name]['seconds']:8.2f} s (from the stored fit)", flush=True)
  result["methods"].update(added)
  result["extended"] = sorted(set(result.get("extended", [])) | set(added))
  files.write_json(path, result)


if __name__ == "__main__":
  app.run(main)
