"""What made each committed artefact (provenance.json beside it, hdb_jax/provenance.py and
scripts/record_provenance.py): every trained artefact has one, tied to its weights, and
the settings it recorded itself are today's configs' (its documented command makes it
with the current configs). Runs writing their own: tests/test_preopt.py and
tests/test_hypernet_train.py."""

import json
import os

import numpy as np
import pytest

from hdb_jax import config_file, hypernet, provenance, weights_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTEFACTS = ("assets/mini_base", "assets/recognizer", "assets/mini_preopt",
             "assets/mini_hypernet_5k", "assets/mini_hypernet_aux", "assets/mini_hypernet_1200",
             "assets/mini_hypernet_k1")


def _record(folder):
  with open(os.path.join(REPO, folder, provenance.FILE)) as f:
    return json.load(f)


@pytest.mark.parametrize("folder", ARTEFACTS)
def test_every_committed_artefact_says_what_made_it(folder):
  record = _record(folder)
  assert record["format"] == provenance.FORMAT and record["artefact"] == folder
  assert record["command"] and record["config_today"] and record["steps"]
  assert record["recorded_settings_equal_today"]
  assert all(record["recorded_settings_equal_today"].values()), record[
      "recorded_settings_equal_today"]
  assert len(record["committed_in"]["commit"]) == 40 and record["unknown"]
  data = record["data"]
  assert len(data["fingerprint"]) == 16 and data["source"]
  # commits since that touched the renderer / dataset code, listed for the reader
  assert isinstance(data["data_code_changed_since"], list)


@pytest.mark.parametrize("folder,variant", [("assets/mini_hypernet_5k", "steps5k"),
                                            ("assets/mini_hypernet_aux", "learnable_aux"),
                                            ("assets/mini_hypernet_1200", "steps5k"),
                                            ("assets/mini_hypernet_k1", "k1")])
def test_committed_hypernetworks_are_their_documented_configs(folder, variant):
  """The weights are the ones the provenance describes, and what hypernet.json recorded
  (architecture, steps, prompt) is configs/hypernet_mini.py's today."""
  record = _record(folder)
  assert record["fingerprint"] == hypernet.weights_fingerprint(os.path.join(REPO, folder))
  config = config_file.load(os.path.join(REPO, "configs", "hypernet_mini.py")
                            + (f":{variant}" if variant else ""))
  with open(os.path.join(REPO, folder, "hypernet.json")) as f:
    info = json.load(f)
  assert info["hypernet"] == config.hypernet.to_dict()
  assert info["steps"] == config.train.steps == record["steps"]
  assert record["config_today"]["train"] == config.train.to_dict()
  assert record["last_logged_step"] == config.train.steps


@pytest.mark.parametrize("folder,variant", [
    *((f"assets/mini_hypernet_{variant}", variant)
      for variant in ("s6", "alpha4", "mean_targets", "views4_targets", "steps10k")),
    ("assets/mini_hypernet", "steps10k_all")])
def test_hypernetworks_that_recorded_their_own_runs(folder, variant):
  """The committed network and the levers' networks (docs/results.md) wrote their
  provenance as they ran: their weights, their config (configs/hypernet_mini.py:<variant>
  today, the run's workdir aside) and a clean code state."""
  record = _record(folder)
  assert record["format"] == provenance.FORMAT and record["code"]["dirty"] is False
  assert record["fingerprint"] == hypernet.weights_fingerprint(os.path.join(REPO, folder))
  config = config_file.load(os.path.join(REPO, "configs", "hypernet_mini.py") + f":{variant}")
  today = provenance.record(config, steps=0, data={}, repo=REPO, argv=[])["config"]
  assert record["config"] == json.loads(json.dumps(today))
  assert record["steps"] == config.train.steps
  assert "configs/hypernet_mini.py" in record["command"]


def test_committed_preoptimization_is_its_documented_config():
  config = config_file.load(os.path.join(REPO, "configs", "preopt_mini.py"),
                            {"data.max_identities": 1200})
  targets = weights_dataset.open_dataset(os.path.join(REPO, "assets", "mini_preopt", "weights"))
  meta = targets.metadata
  assert json.loads(meta["data"]) == config.data.to_dict()
  assert int(meta["steps"]) == config.preopt.steps and int(meta["seed"]) == config.preopt.seed
  assert float(meta["learning_rate"]) == config.preopt.learning_rate
  record = _record("assets/mini_preopt")
  assert record["data"]["identities"] == provenance.identity_ranges(targets.identities)
  assert record["data"]["num_identities"] == len(targets) == 1200


def test_committed_recognizer_is_its_documented_config():
  config = config_file.load(os.path.join(REPO, "configs", "recognizer.py"))
  with open(os.path.join(REPO, "assets", "recognizer", "recognizer.json")) as f:
    info = json.load(f)
  assert {k: v for k, v in info["train"].items() if k != "minutes"} == config.train.to_dict()


def test_records_and_fingerprints():
  assert provenance.identity_ranges([0, 1, 2, 5, 6, 3]) == [[0, 3], [5, 7], [3, 4]]
  assert provenance.identity_ranges([]) == []
  a = np.arange(6, dtype=np.uint8)
  same = provenance.fingerprint([a], ["x"])
  assert same == provenance.fingerprint(iter([a.copy()]), ["x"])   # blocks read once
  assert same != provenance.fingerprint([a.reshape(2, 3)], ["x"])   # shape counts
  assert same != provenance.fingerprint([a], ["y"])
  assert same != provenance.fingerprint([a.astype(np.int16)], ["x"])
  record = provenance.data_record("s", [3, 4], [a])
  assert record["identities"] == [[3, 5]] and record["num_identities"] == 2
  assert record["fingerprint"] != provenance.data_record("s", [3, 5], [a])["fingerprint"]


def test_code_state_outside_a_repository(tmp_path):
  assert provenance.code_state(str(tmp_path)) == {"commit": None, "dirty": None}
