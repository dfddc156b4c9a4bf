"""Models where users keep them (hdb_jax/hub.py): a Hugging Face repo id is resolved from
a cache folder built here in huggingface_hub's own layout (models--owner--name/refs,
snapshots, blobs); nothing goes to the network."""

import hashlib
import os
import shutil

import pytest

from hdb_jax import cli, config_file, hub, lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "configs", "mini.py")
HYPERNET = os.path.join(REPO, "assets", "mini_hypernet")
PHOTO = os.path.join(REPO, "assets", "mini_subject", "photo_0.png")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id, source, commit=COMMIT, branch="main"):
  """`source`'s files as repo `repo_id` at `commit` in a huggingface_hub cache folder:
  file contents in blobs/<sha256>, the snapshot's files symlinks to them, refs/<branch>."""
  root = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = root / "snapshots" / commit
  for folder, _, names in os.walk(source):
    for name in names:
      data = open(os.path.join(folder, name), "rb").read()
      blob = root / "blobs" / hashlib.sha256(data).hexdigest()
      blob.parent.mkdir(parents=True, exist_ok=True)
      blob.write_bytes(data)
      link = snapshot / os.path.relpath(os.path.join(folder, name), source)
      link.parent.mkdir(parents=True, exist_ok=True)
      os.symlink(os.path.relpath(blob, link.parent), link)
  (root / "refs").mkdir(exist_ok=True)
  (root / "refs" / branch).write_text(commit)
  return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hf"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: no request could go out
  return cache


def test_a_repo_id_resolves_to_its_snapshot_in_the_cache(hf_cache):
  snapshot = _cache_repo(hf_cache, "someone/mini-hypernet", HYPERNET)
  assert hub.resolve("someone/mini-hypernet") == str(snapshot)
  assert hub.resolve(f"someone/mini-hypernet@{COMMIT}") == str(snapshot)
  assert hub.resolve(HYPERNET) == HYPERNET  # a local folder stays as it is
  config = config_file.load(MINI, {"personalize.hypernet": "someone/mini-hypernet"})
  assert config.personalize.hypernet == str(snapshot)
  assert os.path.isfile(os.path.join(config.personalize.hypernet, "hypernet.json"))


def test_an_id_not_in_the_cache_says_where_it_looked_and_how_to_fetch_it(hf_cache):
  with pytest.raises(FileNotFoundError) as error:
    hub.resolve("someone/absent-model", "config.model.path")
  message = str(error.value)
  assert "config.model.path 'someone/absent-model'" in message
  assert str(hf_cache / "models--someone--absent-model") in message
  assert "hf download someone/absent-model" in message and "--allow-download" in message


def test_commands_take_repo_ids(hf_cache, tmp_path, capsys):
  """`hdb predict` with the hypernetwork as a repo id in the cache: a LiDB file; `hdb
  personalize` with an absent base id: exit 1 naming the cache, nothing written."""
  _cache_repo(hf_cache, "someone/mini-hypernet", HYPERNET)
  out = tmp_path / "me.safetensors"
  assert cli.main(["predict", "--hypernet", "someone/mini-hypernet", "--image", PHOTO,
                   "--out", str(out)]) == 0
  weights, _ = lora.read(str(out))
  assert weights
  missing = tmp_path / "missing"
  assert cli.main(["personalize", "--config", MINI, "--image", PHOTO, "--out", str(missing),
                   "--set", "model.path=someone/absent-base"]) == 1
  error = capsys.readouterr().err
  assert "someone/absent-base" in error and str(hf_cache) in error
  assert not missing.exists()
  shutil.rmtree(hf_cache)
