"""`hdb personalize` (one photo, a folder) and `hdb predict` stopped by a real SIGTERM or
SIGINT (Ctrl-C) while they write their outputs: exit 130, "stopped ...; nothing written",
and nothing beside --out (no output, no temporary file or folder).

Deterministic: the signal is sent by the command's own process at the moment it is about
to publish its first output (the first `files.check_not_stopped` once a temporary output
exists beside --out), then the process waits; the handler `hdb` installs must turn the
signal into the stop. Run in this process (no interpreter start, programs from one cache),
as the handler is installed by `cli.main` for the command's duration."""

import os
import signal
import time

import pytest

from hdb_jax import cli, files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "configs", "mini.py")
PHOTOS = [os.path.join(REPO, "assets", "mini_subject", f"photo_{i}.png") for i in range(2)]
# The settings of tests/test_personalize.py and tests/test_personalize_block.py, so that
# their compiled programs are reused through the test run's XLA cache.
FAST = ["--set", "personalize.steps=3", "--set", "personalize.per_prompt=1", "--set",
        "personalize.sample_steps=2", "--set", "personalize.upscale=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hdb-cache"))


@pytest.fixture
def signal_on_publish(monkeypatch):
  """signal_on_publish(folder, signal): arm the stop; -> the list of signals sent."""
  sent = []

  def arm(folder, sig):
    real = files.check_not_stopped

    def check():
      if not sent and any(n.startswith(".tmp-") for n in os.listdir(folder)):
        sent.append(sig)
        os.kill(os.getpid(), sig)   # delivered to this (the main) thread's handler
        time.sleep(60)              # the handler's exception ends the wait
        raise AssertionError(f"{signal.Signals(sig).name} did not stop the command")
      real()
    monkeypatch.setattr(files, "check_not_stopped", check)
    return sent
  return arm


def _command(kind, runs, cache):
  out = str(runs / ("me.safetensors" if kind == "predict" else "out"))
  if kind == "predict":
    return ["predict", "--hypernet", os.path.join(REPO, "assets", "mini_hypernet"),
            "--image", PHOTOS[0], "--out", out]
  image = PHOTOS[0] if kind == "photo" else os.path.dirname(PHOTOS[0])
  extra = ["--block", "1"] if kind == "folder" else []
  return ["personalize", "--config", MINI, "--image", image, "--out", out,
          "--cache-dir", cache] + FAST + extra


# Every command with SIGTERM and one with SIGINT in the README command; the other SIGINT
# runs (the same handler) in the slow set .ci/run runs after it.
@pytest.mark.parametrize("kind,sig", [
    ("photo", signal.SIGTERM), ("folder", signal.SIGTERM), ("predict", signal.SIGTERM),
    ("photo", signal.SIGINT), pytest.param("folder", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("predict", signal.SIGINT, marks=pytest.mark.slow)],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_a_stop_while_writing_leaves_nothing(kind, sig, tmp_path, cache, signal_on_publish,
                                             capsys):
  runs = tmp_path / "runs"
  runs.mkdir()
  sent = signal_on_publish(str(runs), sig)
  code = cli.main(_command(kind, runs, cache))
  err = capsys.readouterr().err
  assert sent == [sig], "the command published without reaching the stop point"
  assert code == 130, err[-2000:]
  name = signal.Signals(sig).name
  assert f"stopped (signal {name}); nothing written" in err, err[-2000:]
  assert os.listdir(runs) == []
  assert signal.getsignal(signal.SIGTERM) is not cli._interrupt  # handlers restored
