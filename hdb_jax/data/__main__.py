"""Build a `face_folder` dataset of your photos into the data dir ($HDB_DATA_DIR or
~/tensorflow_datasets). The mini world's dataset: `python -m hdb_jax.mini.dataset`.

    python -m hdb_jax.data --folder ~/my_faces
"""

import argparse
import sys
import time

from hdb_jax import data


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--folder", required=True, help="one subfolder or image per identity")
  parser.add_argument("--image_size", type=int, default=32, help="image size of the records")
  parser.add_argument("--data_dir", default=None, help="default: $HDB_DATA_DIR or "
                      "~/tensorflow_datasets")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    builder = data.build_folder(args.folder, args.data_dir, image_size=args.image_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for split, info in builder.info.splits.items():
    print(f"{split}: {info.num_examples} records")
  print(f"{builder.data_dir} ready in {time.time() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
