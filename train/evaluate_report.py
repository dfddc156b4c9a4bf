"""The comparison table's outputs from its raw results (train/evaluate.py writes them;
train/update_docs.py makes the docs' tables with `markdown_table`): summary.json, table.md,
samples.png, plot.png and the table as text."""

from __future__ import annotations

import collections
import os
import sys

from absl import logging
import numpy as np

from hdb_jax import evaluate, files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def write_figure(config, workdir: str, shown_identities, shown_prompts: list[str]) -> None:
  """samples.png: a row per method, labelled; per shown identity its photo and samples of
  the plain prompt, a background and a style (the same noise in every row)."""
  from PIL import Image
  rows, labels = [], []
  for name in config.methods:
    paths = [os.path.join(workdir, "shown", f"{name}_{int(i)}.png") for i in shown_identities]
    if not all(os.path.exists(p) for p in paths):
      continue
    tiles = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1.0 for p in paths]
    rows.append(np.concatenate([t.reshape(t.shape[0], -1, t.shape[0], 3).transpose(1, 0, 2, 3)
                                for t in tiles]))
    labels.append(name)
  if rows:
    grid = files.labelled_rows(rows, labels)
    with files.atomic_path(os.path.join(workdir, "samples.png")) as tmp:
      Image.fromarray(grid).save(tmp, format="PNG")
    logging.info("columns: per identity its photo, then %s",
                 ", ".join(repr(p) for p in shown_prompts))


def write_summary(config, workdir: str, prompts: list[str]) -> dict:
  """summary.json from every method's raw results (drops against the base's)."""
  table, raw = {}, {}
  for name in config.methods:
    lines = evaluate.ResultsFile(os.path.join(workdir, "results"), name).read()
    if lines:
      table[name] = evaluate.summarize(lines, config.seeds)
      raw[name] = lines
  reference = config.get("reference_method", "full")
  scoring = config.get("scoring", "recognizer")
  spec = evaluate.SCORINGS[scoring]
  # paired: the same identities and noise; against the reference, and the pairs of
  # config.paired_also ({method: other method}) as well
  pairs = [(name, reference) for name in table if name != reference]
  pairs += list(config.get("paired_also", {}).items())
  for name, other in pairs:
    if name in raw and other in raw:
      table[name]["minus_" + other] = {
          metric: evaluate.paired_difference(raw[name], raw[other], config.seeds, metric)
          for metric in spec["paired"]}
  from train import evaluate_methods
  for name, row in table.items():
    row["draws"] = evaluate_methods.instance_draws(config, config.methods[name])
  if "base" in table:
    base = table["base"]
    for name, row in table.items():
      for metric in spec["context"]:
        if row.get(metric) is not None and base.get(metric) is not None:
          row[metric + "_drop"] = base[metric] - row[metric]
      if row.get(spec["gain"]) is not None and base.get(spec["gain"]) is not None:
        row[spec["gain"] + "_gain"] = row[spec["gain"]] - base[spec["gain"]]
  summary = {"command": "python -m train.evaluate " + files.portable_command(sys.argv[1:], REPO),
             "scoring": scoring,
             "identities": config.identities, "prompts": prompts, "seeds": config.seeds,
             "sample_steps": config.sample_steps, "guidance_scale": config.guidance_scale,
             "methods": {k: {key: files.portable_path(v, REPO) if isinstance(v, str)
                                 and os.path.isabs(v) else v
                                 for key, v in config.methods[k].to_dict().items()}
                         for k in table},
             "hypernet_fingerprints": hypernet_fingerprints(config, table),
             "table": table}
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def hypernet_fingerprints(config, names) -> dict:
  """{hypernetwork folder (repository-relative): fingerprint of its weights} of the
  methods among `names` whose rows use a hypernetwork's prediction (kind "personalize"
  without `from_zero`; a method's `hypernet`, else config.personalize.hypernet), read
  when the summary is written."""
  from hdb_jax import hypernet
  out = {}
  for name in names:
    method = config.methods[name]
    if method.kind != "personalize" or method.get("from_zero", False):
      continue
    path = method.get("hypernet") or config.personalize.hypernet
    out[files.portable_path(path, REPO)] = hypernet.weights_fingerprint(path)
  return dict(sorted(out.items()))


def write_plot(summary: dict, path: str) -> None:
  """plot.png: identity accuracy (plain prompt) against context accuracy (background and
  style on the identifier prompts), one point per method with its 95% intervals; and the
  seconds per personalization. Needs matplotlib (the [test] extra has it)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: no %s", path)
    return
  table = summary["table"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
  scoring = summary.get("scoring", "recognizer")
  spec = evaluate.SCORINGS[scoring]
  y_name = spec["gain"]
  for name, row in table.items():
    context = np.nanmean([np.nan if row.get(m) is None else row[m] for m in spec["context"]])
    if row.get(y_name) is None or np.isnan(context):
      continue
    lo, hi = row[y_name + "_ci95"] or (row[y_name],) * 2
    left.errorbar(context, row[y_name], yerr=[[row[y_name] - lo], [hi - row[y_name]]],
                  fmt="o", capsize=3)
    left.annotate(name, (context, row[y_name]), textcoords="offset points",
                  xytext=(5, 4), fontsize=8)
  if scoring == "recognizer":
    left.set_xlabel("context accuracy (background, style; identifier prompts)")
    left.set_ylabel("identity accuracy (plain prompt)")
  else:
    left.set_xlabel("CLIP-T (identifier prompts, identifier removed)")
    left.set_ylabel("Face Rec (plain prompt; 1 - dlib descriptor distance)")
  left.set_title(f"{summary['identities']} held-out identities, 95% CI")
  timed = [(name, row["seconds_median"]) for name, row in table.items()
           if row["seconds_median"] is not None]
  if timed:
    right.barh([n for n, _ in timed], [t for _, t in timed])
    right.set_xscale("log")
    right.set_xlabel("seconds per personalization (median; training + prediction)")
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def markdown_table(summary: dict, seconds: dict | None = None) -> str:
  """The table for docs: mean [95% CI] over identities; paired differences against the
  reference method. One table per scoring present (its columns: evaluate.SCORINGS).
  `seconds` {method: seconds per personalization} from one benchmark run
  (benchmarks/method_seconds.py) replaces the harness's medians, which were measured
  while it sampled and scored, at whatever load each row ran under."""
  def cell(row, name, ci=True):
    value = row.get(name)
    if value is None:
      return "-"
    interval = row.get(name + "_ci95") if ci else None
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"
  fmt = lambda d: "-" if d is None or d["ci95"] is None else (
      f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
  lines = []
  for scoring, spec in evaluate.SCORINGS.items():
    rows = [(n, r) for n, r in summary["table"].items() if evaluate.scoring_of(r) == scoring]
    if not rows:
      continue
    draws = any("draws" in r for _, r in rows)
    header = ("| method | identities | " + " | ".join(h for _, h, _ in spec["columns"])
              + (" | instance draws (batch x steps)" if draws else "")
              + (" | seconds per personalization (one benchmark run) |" if seconds else
                 " | seconds per personalization (median) |"))
    lines += ([""] if lines else []) + [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in rows:
      timed = (seconds or {}).get(name) if seconds else row.get("seconds_median")
      lines.append(" | ".join(
          [f"| {name}", str(row["identities"])]
          + [cell(row, key, ci) for key, _, ci in spec["columns"]]
          + ([str(row.get("draws", "-"))] if draws else [])
          + ["-" if timed is None else f"{timed:.2f}"]) + " |")
    # the reference: the method most rows are paired against (config.paired_also's pairs
    # are the JSON's only)
    against = collections.Counter(k for _, row in rows for k in row if k.startswith("minus_"))
    paired = []
    if against:
      reference = against.most_common(1)[0][0][len("minus_"):]
      paired = [(name, row) for name, row in rows if "minus_" + reference in row]
    if paired:
      headers = dict((key, h) for key, h, _ in spec["columns"])
      lines += ["", f"Paired against {reference} (the same identities and noise; mean "
                f"difference [95% CI], negative: {reference} is higher):", "",
                "| method | " + " | ".join(headers[m] for m in spec["paired"]) + " |",
                "|---|" + "---|" * len(spec["paired"])]
      for name, row in paired:
        diff = row["minus_" + reference]
        lines.append(f"| {name} | " + " | ".join(fmt(diff.get(m)) for m in spec["paired"])
                     + " |")
  return "\n".join(lines)


def json_table(summary: dict) -> str:
  """The table as text: one line per method (a header per scoring present)."""
  fmt = lambda x, w=6: f"{x:{w}.3f}" if x is not None else " " * (w - 1) + "-"
  lines = []
  for scoring, spec in evaluate.SCORINGS.items():
    rows = [(n, r) for n, r in summary["table"].items() if evaluate.scoring_of(r) == scoring]
    if not rows:
      continue
    columns = spec["text"] + (("seconds_median", "s/id", 6),)
    lines.append(f"{'method':22s}" + "".join(f" {label:>{w}s}" for _, label, w in columns))
    for name, row in rows:
      lines.append(f"{name:22s}" + "".join(f" {fmt(row.get(key), w)}" for key, _, w in columns))
  return "\n".join(lines)
