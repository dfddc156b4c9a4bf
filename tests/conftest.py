"""Shared fixtures: the tiny model is built once per session. Compiled XLA programs go to
one on-disk cache for the whole run, shared by both xdist workers and by the commands the
tests launch (through JAX_COMPILATION_CACHE_DIR), so a program compiled once (a training
run and its resumed rerun, the same config in two tests or two processes) is loaded after.
The cache lives in a temporary folder removed at the end of the run."""

import os
import shutil
import tempfile

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE_ENV = "HDB_TEST_XLA_CACHE"


def pytest_configure(config):
  if _CACHE_ENV not in os.environ:  # the controller (workers inherit its environment)
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="hdb-xla-cache-")
    config._hdb_cache_owner = True
  cache_dir = os.environ[_CACHE_ENV]
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir  # for launched commands
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
  if getattr(config, "_hdb_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_config():
  from hdb_jax import config_file
  return config_file.load(os.path.join(REPO, "configs", "tiny.py"))


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
  """(StableDiffusion, params) of configs/tiny.py, random init."""
  from hdb_jax import models
  return models.load_or_build(tiny_config.model)


@pytest.fixture(scope="session")
def tiny_lidb(tiny_config, tiny_model):
  """(spec, aux) of the tiny model's default LiDB targets."""
  from hdb_jax import lidb
  _, params = tiny_model
  cfg = tiny_config.lidb
  spec = lidb.make_spec(params, seed=cfg.seed, a=cfg.a, b=cfg.b, rank=cfg.rank,
                        targets=dict(cfg.targets))
  return spec, lidb.make_aux(spec)
