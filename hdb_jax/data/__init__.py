"""Face datasets as TFDS builders without TensorFlow: your photos (`face_folder`).

    mine = data.folder_source("~/my_faces")      # builds once into the data dir
    mine[0]  # {'image': uint8 [S, S, 3], 'identity': int, 'name': str, 'path': str}
    data.identity_ranges(mine)  # [(identity, start, stop), ...]

`Source` and `identity_ranges` serve every builder with records grouped by identity (the
mini world's `synthetic_faces` too: `hdb_jax.mini.dataset`). TFDS is imported when a
builder is used.
"""

from __future__ import annotations

import os

DATA_DIR_ENV = "HDB_DATA_DIR"
FILE_FORMAT = "array_record"


def default_data_dir() -> str:
  return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"),
                                                      "tensorflow_datasets")


def lock_path(builder) -> str:
  """The lock file that `prepare` holds while it builds `builder`'s dataset."""
  return os.path.join(builder.data_dir_root, f".{builder.name}.lock")


def prepare(builder):
  """`builder.download_and_prepare()` under a lock file in its data dir: two processes that
  need the same dataset (an evaluation beside a training run, test workers) build it once;
  the second waits and then reads it (unlocked, the second build fails renaming into the
  first's finished folder)."""
  import filelock
  os.makedirs(builder.data_dir_root, exist_ok=True)
  with filelock.FileLock(lock_path(builder)):
    builder.download_and_prepare()
  return builder


def build_folder(folder: str, data_dir: str | None = None, image_size: int = 32):
  """The `face_folder` builder for your photos in `folder`, built if missing/changed.

  Unreadable images are skipped: `builder.info.metadata["num_skipped"]`, `["skipped"]`."""
  from hdb_jax.data import face_folder
  builder = face_folder.FaceFolder(config=face_folder.config_for(folder, image_size),
                                   data_dir=data_dir or default_data_dir(),
                                   file_format=FILE_FORMAT)
  return prepare(builder)


class Source:
  """Random-access records of one split: len, [i] -> dict of NumPy values, caption as str.

  Wraps TFDS's ArrayRecordDataSource to decode text (TFDS returns bytes) and to carry
  `images_per_identity` (records are grouped by identity).
  """

  def __init__(self, data_source, images_per_identity: int | None = None):
    self.data_source = data_source
    self.images_per_identity = images_per_identity

  def __len__(self) -> int:
    return len(self.data_source)

  @staticmethod
  def _decode(record: dict) -> dict:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}

  def __getitem__(self, index) -> dict:
    return self._decode(self.data_source[int(index)])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self.data_source.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return f"Source({self.data_source!r}, images_per_identity={self.images_per_identity})"


def folder_source(folder: str, data_dir: str | None = None, image_size: int = 32) -> Source:
  """Records of `build_folder(folder)`: image, identity, name, path (text as str)."""
  builder = build_folder(folder, data_dir, image_size)
  return Source(builder.as_data_source(split="train"))


def identity_ranges(records) -> list[tuple[int, int, int]]:
  """[(identity, start, stop)] of consecutive records sharing an identity.

  Uses `records.images_per_identity` when known (reads one record per identity), else
  scans every record."""
  n = len(records)
  step = getattr(records, "images_per_identity", None)
  if step:
    return [(int(records[s]["identity"]), s, min(s + step, n)) for s in range(0, n, step)]
  ranges = []
  for i in range(n):
    identity = int(records[i]["identity"])
    if ranges and ranges[-1][0] == identity and ranges[-1][2] == i:
      ranges[-1] = (identity, ranges[-1][1], i + 1)
    else:
      ranges.append((identity, i, i + 1))
  return ranges
