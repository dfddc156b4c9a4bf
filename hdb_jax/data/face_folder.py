"""TFDS builder `face_folder`: your own face photos as a dataset (no TensorFlow needed).

Layout of the folder (both may be mixed):
  folder/alice/*.jpg   one subfolder per identity (identity name = subfolder name)
  folder/bob.png       one image per identity (identity name = file name without suffix)

Images are decoded with PIL, center-cropped to a square and resized to `image_size`.
Files with an image suffix that PIL cannot decode are skipped, never crash the build:
they are logged and counted in `builder.info.metadata["num_skipped"]` /
`["skipped"]` (relative path and reason). Other files are ignored. Each folder
contents get their own config (name = folder name + fingerprint of the file list, sizes
and times), so adding photos makes a new build instead of reusing a stale one.

    python -m hdb_jax.data --folder ~/my_faces
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from hdb_jax.files import IMAGE_SUFFIXES


@dataclasses.dataclass
class FaceFolderConfig(tfds.core.BuilderConfig):
  folder: str = ""
  image_size: int = 32


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def scan(folder: str) -> list[tuple[str, list[str]]]:
  """[(identity name, [image paths])], sorted by name; subfolders and loose images."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: not a folder (face_folder needs a folder of "
                            "images or of one subfolder per identity)")
  identities = []
  for entry in sorted(os.listdir(folder)):
    path = os.path.join(folder, entry)
    if os.path.isdir(path) and not entry.startswith("."):
      images = [os.path.join(path, f) for f in sorted(os.listdir(path)) if _is_image(f)
                and os.path.isfile(os.path.join(path, f))]
      if images:
        identities.append((entry, images))
    elif os.path.isfile(path) and _is_image(entry):
      identities.append((os.path.splitext(entry)[0], [path]))
  return identities


def config_for(folder: str, image_size: int = 32) -> FaceFolderConfig:
  """A config named after the folder and a fingerprint of its image files."""
  folder = os.path.abspath(os.path.expanduser(folder))
  digest = hashlib.sha1(f"{folder}|{image_size}".encode())
  for _, paths in scan(folder):
    for path in paths:
      stat = os.stat(path)
      digest.update(f"|{os.path.relpath(path, folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(folder).lower()).strip("_") or "faces"
  return FaceFolderConfig(name=f"{slug[:40]}_{image_size}px_{digest.hexdigest()[:12]}",
                          folder=folder, image_size=image_size,
                          description=f"faces from {folder}")


def decode(path: str, size: int) -> np.ndarray:
  """Image file -> uint8 [size, size, 3]: RGB, center square crop, resize."""
  with Image.open(path) as im:
    im = im.convert("RGB")
    side = min(im.size)
    if side == 0:
      raise ValueError("empty image")
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(im, np.uint8)


def read_folder(folder: str, size: int):
  """(examples in record order, skipped [(relative path, reason)])."""
  examples, skipped = [], []
  identity = 0
  for name, paths in scan(folder):
    images = []
    for path in paths:
      try:
        images.append((path, decode(path, size)))
      except Exception as e:  # PIL raises many types for broken files; skip, never crash
        skipped.append((os.path.relpath(path, folder), f"{type(e).__name__}: {e}"))
    for path, image in images:
      examples.append(dict(image=image, identity=identity, name=name,
                           path=os.path.relpath(path, folder)))
    identity += bool(images)  # identities without a readable image get no number
  return examples, skipped


class FaceFolder(tfds.core.GeneratorBasedBuilder):
  """Face photos from a local folder; one identity per subfolder or per loose image."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = []  # made per folder by `config_for`

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            "identity": tfds.features.Scalar(dtype=np.int64),  # 0.. in name order
            "name": tfds.features.Text(),  # subfolder name or file name without suffix
            "path": tfds.features.Text(),  # relative to the folder
        }),
        disable_shuffling=True,  # records ordered by identity
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    examples, skipped = read_folder(config.folder, config.image_size)
    self.info.metadata.update(folder=config.folder, num_skipped=len(skipped),
                              skipped=[list(s) for s in skipped],
                              num_identities=len({e["identity"] for e in examples}))
    for path, reason in skipped:
      logging.warning("face_folder: skipped unreadable file %s (%s)", path, reason)
    logging.warning("face_folder: %s: %d images of %d identities, %d unreadable files skipped",
                    config.folder, len(examples), self.info.metadata["num_identities"],
                    len(skipped))
    if not examples:
      raise ValueError(f"{config.folder}: no readable image (skipped {len(skipped)} "
                       f"unreadable files; suffixes {', '.join(IMAGE_SUFFIXES)})")
    return {"train": self._generate_examples(examples)}

  def _generate_examples(self, examples):
    for index, example in enumerate(examples):
      yield index, example
