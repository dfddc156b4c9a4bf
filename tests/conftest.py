"""Shared fixtures: the tiny model is built once per session; compiled XLA programs are
cached on disk for the session so that repeated compilations of the same function
(e.g. a training run and its resumed rerun) are loaded, not recompiled."""

import os
import tempfile

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CACHE_DIR = tempfile.mkdtemp(prefix="hdb-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
