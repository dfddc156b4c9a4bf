"""TFDS builder `synthetic_faces`: the mini world's identities (no TensorFlow needed).

Features are `tfds.features.Tensor` / `Scalar` / `Text` (no PNG encoding, which would
need TensorFlow), records go to `array_record` files and are read back with
`builder.as_data_source()` (random access; grain-ready). Shuffling is disabled so that a
split holds its identities in increasing order, `images_per_identity` consecutive
records each; the first record of every identity is a plain photo (style 0).

    python -m hdb_jax.mini.dataset --config default [--data_dir DIR]
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hdb_jax.mini import render

RENDER_CHUNK = 128  # identities rendered per vectorized call (memory ~ chunk * images * 64^2)


@dataclasses.dataclass
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """Identities: `num_train` + `num_holdout` distinct attribute tuples (disjoint), drawn
  by a seeded permutation; `images_per_identity` views each."""
  num_train: int = 2400
  num_holdout: int = 256
  images_per_identity: int = 8
  seed: int = 0
  image_size: int = 32


CONFIGS = (
    SyntheticFacesConfig(name="default", description="2400 train / 256 holdout identities, "
                         "8 images each, 32x32"),
    SyntheticFacesConfig(name="tiny", num_train=64, num_holdout=16, images_per_identity=4,
                         description="for tests: 64 train / 16 holdout identities, 4 images each"),
)


def split_codes(config: SyntheticFacesConfig) -> dict[str, np.ndarray]:
  """Identity codes of each split (sorted int64)."""
  train, holdout = render.split_identities(config.seed, config.num_train, config.num_holdout)
  return {"train": train, "holdout": holdout}


def identity_views(config: SyntheticFacesConfig, identities) -> dict:
  """Views of `identities` (int [M]) in record order: [M * images_per_identity] arrays."""
  k = config.images_per_identity
  seeds = [render.view_seed(config.seed, int(i), j) for i in identities for j in range(k)]
  views = render.sample_views(seeds)
  views["style"][::k] = 0  # the reference image of each identity is a photo
  return views


def render_examples(config: SyntheticFacesConfig, identities):
  """Yield the records of `identities` (int [M]), rendered in vectorized chunks."""
  k = config.images_per_identity
  for start in range(0, len(identities), RENDER_CHUNK):
    chunk = np.asarray(identities[start:start + RENDER_CHUNK], np.int64)
    attributes = np.repeat(render.identity_attributes(chunk), k, axis=0)  # [M * k, A]
    views = identity_views(config, chunk)
    images, masks = render.render(attributes, views, size=config.image_size,
                                  return_face_mask=True)
    for i in range(len(attributes)):
      yield dict(
          image=images[i], face_mask=masks[i], identity=chunk[i // k], attributes=attributes[i],
          background=views["background"][i], style=views["style"][i],
          caption=render.caption(views["background"][i], views["style"][i],
                                 views["name_background"][i], views["name_style"][i]))


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
  """Procedurally rendered faces with known identity attributes and captioned context."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Irises keep their colour in sketch and cartoon styles.",
                   "1.2.0": "face_mask: the person's pixel coverage (face-masked losses)."}
  BUILDER_CONFIGS = list(CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            # Fraction of each pixel covered by the person (not background) x 255.
            "face_mask": tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
            "identity": tfds.features.Scalar(dtype=np.int64),
            "attributes": tfds.features.Tensor(shape=(render.NUM_ATTRIBUTES,), dtype=np.int32),
            "background": tfds.features.Scalar(dtype=np.int32),
            "style": tfds.features.Scalar(dtype=np.int32),
            "caption": tfds.features.Text(),
        }),
        disable_shuffling=True,  # records ordered by identity (data contract)
        metadata=tfds.core.MetadataDict(
            attributes=[[n, list(v)] for n, v in render.ATTRIBUTES],
            backgrounds=list(render.BACKGROUNDS), styles=list(render.STYLES),
            images_per_identity=self.builder_config.images_per_identity),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(codes)
            for split, codes in split_codes(self.builder_config).items()}

  def _generate_examples(self, identities):
    for index, example in enumerate(render_examples(self.builder_config, identities)):
      yield index, example
