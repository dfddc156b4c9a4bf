"""The evaluation harness (train/evaluate.py, hdb_jax/evaluate.py): 2 held-out identities
x 2 prompts x 2 methods end to end, resumed without redoing anything; the summaries'
statistics on known numbers."""

import json
import os
import subprocess
import sys

import signal
import time

import numpy as np
import pytest

from hdb_jax import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, cache, chunk=2):
  return [sys.executable, "-m", "train.evaluate", "--config", "configs/evaluate_mini.py",
          "--workdir", str(workdir), "--cache_dir", str(cache),
          "--methods", "base,hypernet_only", "--config.identities=2", "--config.seeds=2",
          f"--config.chunk={chunk}", "--config.sample_steps=2",
          "--config.prompts=('a {token} {class_name}', 'a sketch of a {token} {class_name}')"]


def _run(workdir, cache, chunk=2):
  return subprocess.run(_command(workdir, cache, chunk), cwd=REPO, capture_output=True,
                        text=True, timeout=900)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """One uninterrupted run: (workdir, program cache, the run's completed process)."""
  root = tmp_path_factory.mktemp("evaluate")
  workdir, cache = root / "eval", root / "cache"
  return workdir, cache, _run(workdir, cache)


def test_two_identities_two_prompts_two_methods_and_resume(uninterrupted):
  workdir, cache, done = uninterrupted
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(os.listdir(workdir / "results")) == ["base.jsonl", "hypernet_only.jsonl"]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["prompts"] == ["a sks face", "a sketch of a sks face"]
  from hdb_jax import hypernet  # hypernet_only predicts with the table's pinned network
  assert summary["hypernet_fingerprints"] == {
      "assets/mini_hypernet_5k": hypernet.weights_fingerprint(
          os.path.join(REPO, "assets", "mini_hypernet_5k"))}
  table = summary["table"]
  assert sorted(table) == ["base", "hypernet_only"]
  for row in table.values():
    assert row["identities"] == 2
    assert 0.0 <= row["identity"] <= 1.0 and 0.0 <= row["valid"] <= 1.0
    lo, hi = row["identity_ci95"]
    assert lo <= row["identity"] <= hi
  # The row's numbers are its raw results': the identity on the plain prompt is each
  # identity's mean over its first `seeds` samples, the gain is over the base's, and the
  # time is the median of the lines' (the base trains nothing: no time).
  raw = {name: evaluate.ResultsFile(str(workdir / "results"), name).read() for name in table}
  plain = {name: np.mean([np.mean(line["scores"]["identity"][:2]) for line in lines])
           for name, lines in raw.items()}
  assert abs(table["hypernet_only"]["identity_plain"] - plain["hypernet_only"]) < 1e-12
  assert abs(table["hypernet_only"]["identity_plain_gain"]
             - (plain["hypernet_only"] - plain["base"])) < 1e-12
  assert table["base"]["seconds_median"] is None
  assert table["hypernet_only"]["seconds_median"] == np.median(
      [line["seconds"] for line in raw["hypernet_only"]])
  line = raw["hypernet_only"][0]
  assert len(line["scores"]["identity"]) == 2 * 2          # prompts x seeds
  assert line["scores"]["background"][:2] == [None, None]  # the plain prompt names none
  assert len(line["scores"]["class_identity"]) == 2 and len(line["scores"]["diversity"]) == 2
  assert (workdir / "samples.png").exists()

  before = (workdir / "results" / "base.jsonl").read_text()
  again = _run(workdir, cache)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / "results" / "base.jsonl").read_text() == before  # nothing redone
  assert "to do" not in again.stderr


@pytest.mark.slow  # ~24 s: a process stopped by SIGTERM, then resumed
def test_sigterm_stops_after_a_chunk_and_the_same_command_finishes_the_table(tmp_path,
                                                                            uninterrupted):
  """SIGTERM once the first chunk is saved (one identity per chunk here): the run ends
  after the chunk in hand with a message and no table; the same command then finishes
  with every sample scored as in the uninterrupted run."""
  reference, cache, _ = uninterrupted
  workdir = tmp_path / "eval"
  process = subprocess.Popen(_command(workdir, cache, chunk=1), cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  first = workdir / "results" / "base.jsonl"
  while process.poll() is None and not first.exists():
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=900)
  assert process.returncode == 0, out[-3000:]
  assert "rerun the same command to continue" in out, out[-3000:]
  assert not (workdir / "summary.json").exists()
  again = _run(workdir, cache, chunk=1)
  assert again.returncode == 0, again.stderr[-3000:]
  for method in ("base", "hypernet_only"):
    resumed = evaluate.ResultsFile(str(workdir / "results"), method).read()
    whole = evaluate.ResultsFile(str(reference / "results"), method).read()
    assert [line["identity"] for line in resumed] == [line["identity"] for line in whole]
    for a, b in zip(resumed, whole):
      assert a["scores"] == b["scores"], method


def test_summary_statistics():
  seeds = 2
  lines = [{"identity": i, "seconds": float(i + 1),
            "scores": {"identity": [v, v, 0.5, 0.5], "background": [None, None, 1.0, 0.0],
                       "style": [None, None, None, None], "valid": [1.0] * 4,
                       "diversity": [0.1, 0.3], "class_identity": [0.25, 0.25]}}
           for i, v in enumerate([0.0, 1.0, 1.0, 0.0])]
  row = evaluate.summarize(lines, seeds)
  assert row["identities"] == 4
  assert row["identity_plain"] == 0.5 and row["identity"] == 0.5
  assert row["background"] == 0.5 and row["style"] is None and row["style_ci95"] is None
  assert row["diversity"] == 0.2 and row["class_identity"] == 0.25
  assert row["seconds_median"] == 2.5
  lo, hi = row["identity_plain_ci95"]
  assert 0.0 <= lo < 0.5 < hi <= 1.0
  # bootstrap intervals shrink with more identities
  wide = evaluate.bootstrap_ci(np.r_[np.zeros(5), np.ones(5)])
  narrow = evaluate.bootstrap_ci(np.r_[np.zeros(500), np.ones(500)])
  assert (narrow[1] - narrow[0]) < (wide[1] - wide[0]) / 5


def test_paired_difference_uses_the_shared_identities():
  def line(identity, value):
    return {"identity": identity, "seconds": 1.0,
            "scores": {"identity": [value] * 2, "background": [None, None],
                       "style": [None, None], "valid": [1.0, 1.0], "diversity": [0.0],
                       "class_identity": [0.0, 0.0]}}
  mine = [line(i, 0.5 + 0.01 * i) for i in range(20)]
  reference = [line(i, 0.4 + 0.01 * i) for i in range(1, 21)]  # identity 0 missing, 20 extra
  diff = evaluate.paired_difference(mine, reference, 2, "identity")
  assert diff["identities"] == 19
  assert abs(diff["mean"] - 0.1) < 1e-9 and diff["ci95"][1] - diff["ci95"][0] < 1e-9
  assert evaluate.paired_difference(mine, reference, 2, "style") is None


def test_committed_table_supports_what_docs_results_md_says():
  """docs/results.md reads its numbers from docs/mini_results.json: its table is the
  JSON's, each marked number is the JSON's value, each marked claim (ties, wins, ranges)
  holds (train/update_docs.py); then the table's main findings, asserted directly."""
  from train import evaluate_report, update_docs
  with open(os.path.join(REPO, "docs", "mini_results.json")) as f:
    summary = json.load(f)
  with open(os.path.join(REPO, "docs", "results.md")) as f:
    page = f.read()
  assert "t=docs/mini_results.json:table" in page
  with open(os.path.join(REPO, update_docs.SECONDS)) as f:  # the table's seconds column
    seconds = {k: v["seconds"] for k, v in json.load(f)["methods"].items()}
  assert evaluate_report.markdown_table(summary, seconds) in page
  numbers, claims = update_docs.NUMBER.findall(page), update_docs.CLAIM.findall(page)
  assert len(numbers) > 100 and len(claims) > 10
  rendered, problems = update_docs.render(page, "docs/results.md")
  assert not problems, problems
  assert rendered == page, update_docs.differences(page, rendered)[:10]
  table = summary["table"]
  assert summary["identities"] >= 50 and summary["seeds"] == 2 and len(summary["prompts"]) == 12
  for name in ("base", "hypernet_only", "full", "full_k1", "full_rank1", "no_hypernet",
               "lidb_dreambooth_400"):
    assert table[name]["identities"] == 50, name
  full, base = table["full"], table["base"]
  assert full["identity_plain"] > base["identity_plain"] + 0.15
  assert full["background_drop"] < 0.05 and full["style_drop"] < 0.05  # context kept
  for ablation in ("no_hypernet", "full_rank1", "hypernet_only"):
    hi = table[ablation]["minus_full"]["identity"]["ci95"][1]
    assert hi < 0, ablation  # full is higher on the identifier prompts, paired
  # a network trained with k = 1 ties the s = 4 one after finetuning (docs/results.md)
  low, high = table["full_k1"]["minus_full"]["identity"]["ci95"]
  assert low < 0 < high
  # 40 steps of the full method against 400 of LiDB DreamBooth: as good, ~10x faster
  tie = table["lidb_dreambooth_400"]["minus_full"]["identity"]["ci95"]
  assert tie[0] < 0 < tie[1]
  assert table["lidb_dreambooth_400"]["seconds_median"] > 5 * full["seconds_median"]
  # Every row of configs/evaluate_mini.py is in the committed table.
  from hdb_jax import config_file
  methods = config_file.load(os.path.join(REPO, "configs", "evaluate_mini.py")).methods
  assert sorted(table) == sorted(methods)
  assert all(row["identities"] == 50 for row in table.values())
  # The rows that predict with a hypernetwork were made with the committed networks.
  config = config_file.load(os.path.join(REPO, "configs", "evaluate_mini.py"))
  assert summary["hypernet_fingerprints"] == evaluate_report.hypernet_fingerprints(
      config, table)
  # (the `default` row: configs/mini.py's network; the others: the table's pinned one)
  assert sorted(summary["hypernet_fingerprints"]) == ["assets/mini_hypernet",
                                                      "assets/mini_hypernet_1200",
                                                      "assets/mini_hypernet_5k",
                                                      "assets/mini_hypernet_aux",
                                                      "assets/mini_hypernet_k1"]
  # config.paired_also: the default paired against the same recipe from the table's
  # network too, from their raw results; the markdown's paired section stays against full.
  def raw(name):
    with open(os.path.join(REPO, "docs", "mini_results", f"{name}.jsonl")) as f:
      return [json.loads(line) for line in f]
  assert table["default"]["minus_default_5k"]["identity"] == evaluate.paired_difference(
      raw("default"), raw("default_5k"), summary["seeds"], "identity")
  assert "minus_default" not in table["default_5k"]
  assert "Paired against full " in evaluate_report.markdown_table(summary)
  # Agg-1 (whole UNet, high lr) breaks the prompts; DreamBooth proper does not.
  assert table["dreambooth_agg1"]["background_drop"] > 0.3
  assert table["dreambooth_400"]["background_drop"] < 0.05
  # Prior preservation keeps the class prompt from drifting to the subject.
  for name in ("lidb_dreambooth_400", "lora_dreambooth_400"):
    assert table[name + "_prior"]["class_identity"] < table[name]["class_identity"] - 0.15
  # Textual Inversion: far below the full method on identity, paired.
  assert table["textual_inversion"]["minus_full"]["identity_plain"]["ci95"][1] < 0


def _recomputes(folder, seeds, name, row):
  """`row` of a committed summary is what evaluate.summarize makes of its raw results
  (folder/results/<name>.jsonl), on 50 identities."""
  with open(os.path.join(folder, "results", f"{name}.jsonl")) as f:
    again = evaluate.summarize([json.loads(line) for line in f], seeds)
  assert row["identities"] == again["identities"] == 50, name
  for metric in ("identity_plain", "identity", "background", "style"):
    assert abs(row[metric] - again[metric]) < 1e-12, (name, metric)


def _made_with_the_configured_networks(config, summary):
  """The hypernetworks the summary's rows predicted with are the ones its config names
  today (each folder's weights, by fingerprint)."""
  from train import evaluate_report
  assert summary["hypernet_fingerprints"] == evaluate_report.hypernet_fingerprints(
      config, summary["table"])


def test_committed_frontier_rows_recompute_from_their_raw_results():
  """docs/mini_frontier: each row of summary.json is what evaluate.summarize makes of its
  raw results, on the table's 50 identities, for exactly configs/evaluate_frontier.py's
  methods as configured."""
  from hdb_jax import config_file
  folder = os.path.join(REPO, "docs", "mini_frontier")
  with open(os.path.join(folder, "summary.json")) as f:
    summary = json.load(f)
  config = config_file.load(os.path.join(REPO, "configs", "evaluate_frontier.py"))
  assert sorted(summary["table"]) == sorted(config.methods)
  with open(os.path.join(REPO, "docs", "mini_results.json")) as f:
    table_settings = {k: v for k, v in json.load(f).items() if k in ("identities", "prompts",
                                                                     "seeds", "sample_steps")}
  assert {k: summary[k] for k in table_settings} == table_settings
  for name, row in summary["table"].items():
    assert summary["methods"][name] == config.methods[name].to_dict(), name
    _recomputes(folder, summary["seeds"], name, row)
  _made_with_the_configured_networks(config, summary)


def test_committed_lever_rows_recompute_from_their_raw_results():
  """docs/mini_levers: each row measured so far is a method of configs/evaluate_levers.py
  as configured, on the table's 50 identities, and is what evaluate.summarize makes of its
  raw results; its `full` row is the table's own (the same results file)."""
  from hdb_jax import config_file
  folder = os.path.join(REPO, "docs", "mini_levers")
  with open(os.path.join(folder, "summary.json")) as f:
    summary = json.load(f)
  config = config_file.load(os.path.join(REPO, "configs", "evaluate_levers.py"))
  assert set(summary["table"]) <= set(config.methods) and "full" in summary["table"]
  for name, row in summary["table"].items():
    assert summary["methods"][name] == config.methods[name].to_dict(), name
    _recomputes(folder, summary["seeds"], name, row)
  _made_with_the_configured_networks(config, summary)
  with open(os.path.join(folder, "results", "full.jsonl")) as a, \
       open(os.path.join(REPO, "docs", "mini_results", "full.jsonl")) as b:
    assert a.read() == b.read()


def test_committed_hypernetwork_lever_rows_recompute_from_their_raw_results():
  """docs/mini_hypernet_levers: every method of configs/evaluate_hypernet_levers.py as
  configured, recomputed from its raw results; the rows it shares with the table (base,
  hypernetwork only at s = 4 and 6) are the table's own results."""
  from hdb_jax import config_file
  folder = os.path.join(REPO, "docs", "mini_hypernet_levers")
  with open(os.path.join(folder, "summary.json")) as f:
    summary = json.load(f)
  from hdb_jax import files
  config = config_file.load(os.path.join(REPO, "configs", "evaluate_hypernet_levers.py"))
  assert sorted(summary["table"]) == sorted(config.methods)
  for name, row in summary["table"].items():
    method = {k: files.portable_path(v, REPO) if isinstance(v, str) and os.path.isabs(v) else v
              for k, v in config.methods[name].to_dict().items()}
    assert summary["methods"][name] == method, name
    _recomputes(folder, summary["seeds"], name, row)
    if name != "hypernet_only_1200":  # the reference
      assert "minus_hypernet_only_1200" in row, name
  _made_with_the_configured_networks(config, summary)
  for name in ("base", "hypernet_only", "hypernet_only_s6"):
    with open(os.path.join(folder, "results", f"{name}.jsonl")) as a, \
         open(os.path.join(REPO, "docs", "mini_results", f"{name}.jsonl")) as b:
      assert a.read() == b.read(), name
