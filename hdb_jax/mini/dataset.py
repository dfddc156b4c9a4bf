"""The mini world's dataset `synthetic_faces`: build it, read it.

    python -m hdb_jax.mini.dataset --config default [--data_dir DIR]

    from hdb_jax.mini import dataset
    train = dataset.source("default", "train")   # builds if missing; random access
    train[0]  # {'image': uint8 [32, 32, 3], 'face_mask': uint8 [32, 32], 'identity': int,
              #  'attributes': int32 [A], 'background': int, 'style': int, 'caption': str}
"""

from __future__ import annotations

import argparse
import sys
import time

from hdb_jax import data


def build(config_name: str = "default", data_dir: str | None = None):
  """The `synthetic_faces` builder for `config_name` ('default', 'tiny'), built if missing."""
  from hdb_jax.mini import synthetic_faces
  names = [c.name for c in synthetic_faces.CONFIGS]
  if config_name not in names:
    raise ValueError(f"synthetic_faces has no config {config_name!r} (configs: {names})")
  builder = synthetic_faces.SyntheticFaces(config=config_name,
                                           data_dir=data_dir or data.default_data_dir(),
                                           file_format=data.FILE_FORMAT)
  return data.prepare(builder)


def source(config_name: str = "default", split: str = "train",
           data_dir: str | None = None) -> data.Source:
  """Records of `split` ('train' or 'holdout') of synthetic_faces/`config_name`."""
  builder = build(config_name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"synthetic_faces/{config_name} has no split {split!r} "
                     f"(splits: {list(builder.info.splits)})")
  return data.Source(builder.as_data_source(split=split),
                     builder.builder_config.images_per_identity)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Build synthetic_faces into the data dir "
                                   "($HDB_DATA_DIR or ~/tensorflow_datasets).")
  parser.add_argument("--config", default="default", help="synthetic_faces config: default, tiny")
  parser.add_argument("--data_dir", default=None, help="default: $HDB_DATA_DIR or "
                      "~/tensorflow_datasets")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    builder = build(args.config, args.data_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for split, info in builder.info.splits.items():
    print(f"{split}: {info.num_examples} records")
  print(f"{builder.data_dir} ready in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
