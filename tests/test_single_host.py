"""The single-host entry points refuse a multi-process launch, saying why (docs/pods.md):
the evaluation harness (train/evaluate.py) and batched personalization (`hdb personalize
--image FOLDER`, hdb_jax/personalize_block.py) run on one process's devices. Here
jax.process_count() reports 2, as on a pod slice launched with `--worker=all`; the
refusal comes before anything is read or written."""

import os
import shutil

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)


def test_evaluation_refuses_a_multi_process_launch(two_processes, tmp_path):
  from train import evaluate
  with pytest.raises(SystemExit) as exited:
    evaluate.main(["evaluate"])  # refused before its flags are read
  message = str(exited.value.code)
  assert "runs on one host" in message and "process 1 of 2" in message, message
  assert "docs/pods.md" in message


def test_evaluation_runs_in_one_process():
  from train import evaluate
  evaluate.refuse_multi_process()  # nothing raised: the check reads the real count


def test_batched_personalization_refuses_a_multi_process_launch(two_processes, tmp_path,
                                                                capsys):
  from hdb_jax import cli
  photos = tmp_path / "photos"
  photos.mkdir()
  shutil.copy(os.path.join(REPO, "assets", "mini_subject", "photo_0.png"), photos / "a.png")
  out = tmp_path / "out"
  code = cli.main(["personalize", "--config", os.path.join(REPO, "configs", "mini.py"),
                   "--image", str(photos), "--out", str(out), "--no-crop"])
  assert code == 1
  err = capsys.readouterr().err
  assert "batched personalization runs on one host" in err, err
  assert "process 1 of 2" in err, err
  assert not out.exists()
