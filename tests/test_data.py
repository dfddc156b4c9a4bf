"""Mini-world data: renderer, synthetic_faces (tiny config) and face_folder builders."""

import hashlib
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from hdb_jax import data
from hdb_jax.mini import dataset, render, synthetic_faces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = re.compile(r"^a( (photo|sketch|painting|cartoon) of a)? face"
                     r"( on a (blue|green|purple|pink|gray) background)?$")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """synthetic_faces/tiny built once for this module."""
  path = str(tmp_path_factory.mktemp("tfds"))
  dataset.build("tiny", path)
  return path


@pytest.fixture(scope="module")
def tiny_records(tiny_dir):
  """{split: list of records} of synthetic_faces/tiny."""
  out = {}
  for split in ("train", "holdout"):
    src = dataset.source("tiny", split, tiny_dir)
    out[split] = src.__getitems__(range(len(src)))
  return out


def _digest(records) -> str:
  h = hashlib.sha256()
  for r in records:
    h.update(r["image"].tobytes() + r["caption"].encode() + r["attributes"].tobytes())
  return h.hexdigest()


def test_tiny_shapes_and_fields(tiny_records):
  config = next(c for c in synthetic_faces.CONFIGS if c.name == "tiny")
  assert len(tiny_records["train"]) == config.num_train * config.images_per_identity
  assert len(tiny_records["holdout"]) == config.num_holdout * config.images_per_identity
  for record in tiny_records["train"] + tiny_records["holdout"]:
    assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
    assert record["face_mask"].shape == (32, 32) and record["face_mask"].dtype == np.uint8
    assert record["attributes"].shape == (render.NUM_ATTRIBUTES,)
    assert record["attributes"].dtype == np.int32
    np.testing.assert_array_equal(record["attributes"],
                                  render.identity_attributes(record["identity"]))
    assert 0 <= record["background"] < len(render.BACKGROUNDS)
    assert 0 <= record["style"] < len(render.STYLES)
  images = np.stack([r["image"] for r in tiny_records["train"]])
  assert images.std() > 30  # not blank


def test_captions_name_context_only(tiny_records):
  with open(os.path.join(REPO, "assets", "mini_words.txt")) as f:
    vocabulary = set(f.read().split())
  captions = set()
  for record in tiny_records["train"] + tiny_records["holdout"]:
    text = record["caption"]
    captions.add(text)
    assert isinstance(text, str) and CAPTION.match(text), text
    assert set(text.split()) <= vocabulary and "sks" not in text.split()
    background, style = render.parse_caption(text)
    assert style == record["style"]  # no style word means a photo
    assert background in (-1, record["background"])
  assert len(captions) > 10  # context varies


def test_splits_disjoint_and_grouped_by_identity(tiny_records):
  config = next(c for c in synthetic_faces.CONFIGS if c.name == "tiny")
  k = config.images_per_identity
  identities = {}
  for split, records in tiny_records.items():
    ids = [int(r["identity"]) for r in records]
    ranges = data.identity_ranges(records)  # plain list: scans every record
    assert [stop - start for _, start, stop in ranges] == [k] * (len(records) // k)
    assert [i for i, _, _ in ranges] == sorted(set(ids))
    assert all(records[start]["style"] == 0 for _, start, _ in ranges)  # photo reference
    identities[split] = set(ids)
  assert not identities["train"] & identities["holdout"]
  assert len(identities["train"]) == config.num_train


def test_source_helpers(tiny_dir, tiny_records):
  src = dataset.source("tiny", "holdout", tiny_dir)
  assert src.images_per_identity == 4
  assert data.identity_ranges(src) == data.identity_ranges(tiny_records["holdout"])
  with pytest.raises(ValueError, match="no split"):
    dataset.source("tiny", "validation", tiny_dir)
  with pytest.raises(ValueError, match="no config"):
    dataset.build("huge", tiny_dir)
  import grain
  batch = next(iter(grain.MapDataset.source(src).batch(8)))
  assert batch["image"].shape == (8, 32, 32, 3)


def test_build_is_deterministic(tmp_path, tiny_records):
  again = dataset.source("tiny", "train", str(tmp_path))
  assert _digest(again.__getitems__(range(len(again)))) == _digest(tiny_records["train"])


def test_default_config_identities():
  config = next(c for c in synthetic_faces.CONFIGS if c.name == "default")
  codes = synthetic_faces.split_codes(config)
  assert len(set(codes["train"])) >= 2000
  assert len(codes["holdout"]) > 0 and not set(codes["train"]) & set(codes["holdout"])
  assert len(render.BACKGROUNDS) >= 4 and len(render.STYLES) >= 4
  assert render.NUM_IDENTITIES == len(set(render.identity_code(
      render.identity_attributes(np.arange(render.NUM_IDENTITIES)))))


def test_render_independent_of_batch():
  attributes = render.identity_attributes([5, 900, 4000])
  views = render.sample_views([11, 12, 13])
  together = render.render(attributes, views)
  alone = render.render(attributes[1:2], {k: v[1:2] for k, v in views.items()})
  np.testing.assert_array_equal(together[1], alone[0])


def test_every_attribute_visible_in_every_style():
  """Changing one attribute value changes a clear part of the picture, in each style."""
  base = np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int32)
  for style in range(len(render.STYLES)):
    for i, n in enumerate(render.NUM_CLASSES):
      variants = np.repeat(base[None], n, axis=0)
      variants[:, i] = np.arange(n)
      views = render.sample_views([7] * n)
      views["style"][:] = style
      images = render.render(variants, views).astype(np.int32)
      for value in range(1, n):
        changed = (np.abs(images[value] - images[0]).max(-1) > 40).sum()
        assert changed >= 4, (render.STYLES[style], render.ATTRIBUTE_NAMES[i], value, changed)


def _write_folder(root):
  rng = np.random.default_rng(0)
  for path, size in (("alice/1.png", (40, 50)), ("alice/2.jpg", (64, 32)),
                     ("bob/1.png", (32, 32)), ("carol.png", (80, 80))):
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
        os.path.join(root, path))
  with open(os.path.join(root, "bob", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff not really a jpeg")
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image: ignored")


def test_face_folder_skips_corrupt_file(tmp_path, caplog):
  folder = str(tmp_path / "faces")
  _write_folder(folder)
  with caplog.at_level(logging.WARNING):
    builder = data.build_folder(folder, str(tmp_path / "tfds"))
  assert builder.info.metadata["num_skipped"] == 1
  assert builder.info.metadata["skipped"][0][0] == os.path.join("bob", "broken.jpg")
  assert "1 unreadable files skipped" in caplog.text
  src = data.folder_source(folder, str(tmp_path / "tfds"))
  records = src.__getitems__(range(len(src)))
  assert [(r["name"], r["identity"]) for r in records] == [
      ("alice", 0), ("alice", 0), ("bob", 1), ("carol", 2)]
  assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in records)
  assert data.identity_ranges(src) == [(0, 0, 2), (1, 2, 3), (2, 3, 4)]


def test_face_folder_nothing_readable(tmp_path):
  folder = tmp_path / "bad"
  folder.mkdir()
  (folder / "x.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="no readable image"):
    data.build_folder(str(folder), str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="not a folder"):
    data.build_folder(str(tmp_path / "missing"), str(tmp_path / "tfds"))


# Another process tries the lock file without waiting: exit 3 if it is held.
_TRY_LOCK = ("import sys, filelock\n"
             "try:\n  filelock.FileLock(sys.argv[1], timeout=0).acquire()\n"
             "except filelock.Timeout:\n  sys.exit(3)\n")


def test_a_dataset_is_built_holding_a_lock_other_processes_wait_for(tmp_path, monkeypatch):
  """Two jobs that need synthetic_faces at the same time (an evaluation beside a training
  run) must not build it both (the second crashed renaming into the first's finished
  folder): while the build runs, another process is refused its lock file; once built,
  the lock is free and a second build reads the dataset without building it again.
  Deterministic: the check runs inside the build, not in a race between two builds."""
  import subprocess
  import sys
  from hdb_jax.mini import synthetic_faces
  build, tries = synthetic_faces.SyntheticFaces.download_and_prepare, []

  def try_the_lock(builder):
    return subprocess.run([sys.executable, "-c", _TRY_LOCK, data.lock_path(builder)],
                          timeout=60).returncode

  def observed_build(builder, *args, **kwargs):
    if not os.path.exists(builder.data_dir):  # the build proper, not a read
      tries.append(try_the_lock(builder))
    return build(builder, *args, **kwargs)

  monkeypatch.setattr(synthetic_faces.SyntheticFaces, "download_and_prepare", observed_build)
  builder = dataset.build("tiny", str(tmp_path))
  assert tries == [3]                  # built once, and held the lock against the other
  assert try_the_lock(builder) == 0    # released once built
  again = dataset.build("tiny", str(tmp_path))
  assert tries == [3] and again.data_dir == builder.data_dir  # read, not built again
  assert len(dataset.source("tiny", "train", str(tmp_path))) > 0
