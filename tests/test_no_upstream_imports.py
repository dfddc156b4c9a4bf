"""`hdb personalize` and a training entry point run without diffusers, transformers or
torch: the model code is our own (hdb_jax/nn). Checked on real runs in new processes,
from Python's own import log (`-X importtime`), with the model code traced (no stored
programs), so every model module is imported."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = ("diffusers", "transformers", "torch", "peft")


def imported_packages(stderr: str) -> set[str]:
  """Top-level packages named in a `python -X importtime` log."""
  names = set()
  for line in stderr.splitlines():
    if line.startswith("import time:") and "|" in line:
      names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
  return names


def test_the_import_log_is_read():
  """The check can fail: a process that imports safetensors' torch side is caught."""
  done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import numpy, json"],
                        capture_output=True, text=True, check=True)
  assert {"numpy", "json"} <= imported_packages(done.stderr)
  assert "torch" not in imported_packages(done.stderr)


def test_hdb_personalize_imports_no_upstream_library(tmp_path):
  command = [sys.executable, "-X", "importtime", "-m", "hdb_jax.cli", "personalize",
             "--config", "configs/mini.py", "--image", "assets/mini_subject/photo_0.png",
             "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
             "--steps", "1", "--set", "personalize.per_prompt=1",
             "--set", "personalize.sample_steps=2"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  packages = imported_packages(done.stderr)
  assert {"hdb_jax", "jax", "flax"} <= packages
  assert not packages & set(UPSTREAM), sorted(packages & set(UPSTREAM))
  assert os.path.exists(tmp_path / "out" / "personalization.safetensors")


@pytest.mark.slow  # ~40 s: a training run in a new interpreter (hdb personalize's is fast)
@pytest.mark.parametrize("module", ["train.lidb_dreambooth"])
def test_a_training_entry_point_imports_no_upstream_library(tmp_path, module):
  command = [sys.executable, "-X", "importtime", "-m", module, "--config", "configs/tiny.py",
             "--workdir", str(tmp_path / "run"), "--config.train.steps=2",
             "--config.sample.per_prompt=1", "--config.sample.num_steps=2"]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla")))
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  packages = imported_packages(done.stderr)
  assert {"hdb_jax", "jax", "optax"} <= packages
  assert not packages & set(UPSTREAM), sorted(packages & set(UPSTREAM))
