"""Config overrides of the absl entry points (`train.*`, `--config.key=value`): an unknown
key or a value of the wrong type stops the command before any work, naming the key."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"train.lidb_dreambooth": "configs/mini.py",
                "train.preoptimize": "configs/preopt_mini.py",
                "train.train_hypernet": "configs/hypernet_mini.py",
                "train.evaluate": "configs/evaluate_mini.py"}


def _run(module, config, override, workdir):
  command = [sys.executable, "-m", module, "--config", config, "--workdir", str(workdir),
             override]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_unknown_config_keys_are_refused(module, tmp_path):
  done = _run(module, ENTRY_POINTS[module], "--config.no_such_key=1", tmp_path / "w")
  assert done.returncode != 0
  assert "no_such_key" in done.stderr, done.stderr[-2000:]
  assert not (tmp_path / "w").exists()


# an integer setting of each entry point's config
INTEGER_KEYS = {"train.lidb_dreambooth": "train.steps", "train.preoptimize": "preopt.steps",
                "train.train_hypernet": "train.steps", "train.evaluate": "identities"}


@pytest.mark.parametrize("module", [  # one new interpreter each: three of them slow
    pytest.param(m, marks=() if m == "train.evaluate" else pytest.mark.slow)
    for m in sorted(ENTRY_POINTS)])
def test_values_of_the_wrong_type_are_refused(module, tmp_path):
  key = INTEGER_KEYS[module]
  done = _run(module, ENTRY_POINTS[module], f"--config.{key}=many", tmp_path / "w")
  assert done.returncode != 0
  assert key.split(".")[-1] in done.stderr and "many" in done.stderr, done.stderr[-2000:]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", [
    ["info"], ["import", "--lora", "x.safetensors", "--out", "OUT/x.safetensors"],
    ["export-base", "--out", "OUT/base"], ["personalize", "--image", "x.png", "--out", "OUT/me"],
    ["demo"]], ids=lambda c: c[0])
def test_hdb_commands_refuse_values_of_the_wrong_type(command, tmp_path, capsys):
  """Every `hdb` command that reads a config (--set KEY=VALUE): refused by name before
  any work, exit 1, nothing written."""
  from hdb_jax import cli
  argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
  assert cli.main(argv + ["--config", os.path.join(REPO, "configs", "mini.py"),
                          "--set", "personalize.rank=abc"]) == 1
  assert "'personalize.rank' cannot take 'abc'" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_hdb_takes_config_flags_as_the_train_scripts_do(tmp_path, capsys):
  """`hdb ... --config.KEY=VALUE` (or `--config.KEY VALUE`) is `--set KEY=VALUE`: the
  spelling of docs/demo.md's SD1.5 command; a wrong key is refused by name."""
  from hdb_jax import cli
  assert cli._config_flags(["demo", "--config", "configs/sd15.py", "--config.model.path=/m",
                            "--config.personalize.hypernet", "/h"]) == [
      "demo", "--config", "configs/sd15.py", "--set", "model.path=/m",
      "--set", "personalize.hypernet=/h"]
  assert cli.main(["personalize", "--config", os.path.join(REPO, "configs", "mini.py"),
                   "--image", "x.png", "--out", str(tmp_path / "out"),
                   "--config.personalize.rnak=8"]) == 1
  assert "unknown config key 'personalize.rnak'" in capsys.readouterr().err
