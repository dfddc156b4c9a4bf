"""Files: atomic writes, image reading, image grids."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# Set by a stop signal (hdb_jax.cli installs the handler). The handler also raises
# KeyboardInterrupt, but Python drops an exception raised while it runs a GC callback or a
# __del__; this flag still stops the rename that would publish an output.
_stop_reason: str | None = None


def request_stop(reason: str | None) -> None:
  """Refuse every later atomic rename (None clears it)."""
  global _stop_reason
  _stop_reason = reason


def check_not_stopped() -> None:
  """KeyboardInterrupt when a stop was requested: call before publishing an output."""
  if _stop_reason is not None:
    raise KeyboardInterrupt(_stop_reason)


def _umask() -> int:
  mask = os.umask(0)  # the only way to read it is to set it
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str):
  """Yield a temp file path beside `path`; rename it onto `path` only on success."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path),
                             dir=os.path.dirname(path))
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    check_not_stopped()
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_writable(path: str) -> None:
  """Raise OSError naming `path` unless a file or folder can be created there (its nearest
  existing parent folder takes a temporary file): checked before long work, so that an
  unwritable output is reported at once, not after minutes of training."""
  path = os.path.abspath(path)
  parent = path if os.path.isdir(path) else os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"{path}: cannot write here ({parent} is a file, not a folder)")
  try:
    fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=parent)
  except OSError as e:
    raise OSError(e.errno, f"{path}: cannot write here ({e.strerror})") from e
  os.close(fd)
  os.remove(probe)


def json_safe(value):
  """`value` with float NaN/Inf replaced by None (JSON has no NaN) and NumPy scalars and
  arrays turned into Python numbers and lists."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, value, indent: int = 2) -> None:
  """Write `value` as strict JSON (NaN -> null), atomically."""
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(json_safe(value), f, indent=indent, allow_nan=False)
    f.write("\n")


def portable_path(path: str, root: str) -> str:
  """`path` relative to `root` when inside it, else its last component: no machine paths
  in committed files."""
  path, root = os.path.abspath(path), os.path.abspath(root)
  if os.path.commonpath([path, root]) == root:
    return os.path.relpath(path, root)
  return os.path.basename(path.rstrip(os.sep))


def portable_command(argv: list[str], root: str) -> str:
  """A command line for a committed file: paths under `root` made relative to it."""
  prefix = os.path.abspath(root) + os.sep
  return " ".join(arg.replace(prefix, "") for arg in argv)


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yield a temp folder beside `path`; on success it replaces `path` (old one removed)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path), dir=os.path.dirname(path))
  os.chmod(tmp, 0o755)
  try:
    yield tmp
    check_not_stopped()
    if os.path.exists(path):
      old = path + ".old"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def list_images(path: str) -> list[str]:
  """An image file, or the image files of a folder (sorted)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such image file or folder")
  found = sorted(os.path.join(path, f) for f in os.listdir(path)
                 if f.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise FileNotFoundError(f"{path}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
  return found


def read_rgb(path: str, min_side: int = 1) -> np.ndarray:
  """The image at `path` as uint8 RGB [H, W, 3], upright (EXIF orientation applied).

  Raises ValueError naming `path` for an unreadable file, an image with a side under
  `min_side` pixels, or one too large to decode safely (PIL's decompression-bomb limit).
  """
  from PIL import ImageOps
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
      if min(im.size) < min_side:
        raise _TooSmall(f"{path}: image is {im.width}x{im.height}; at least {min_side} "
                        "pixels on each side are needed")
      if im.mode == "I" or im.mode.startswith("I;16"):
        # 16-bit (or 32-bit) grayscale: PIL's convert("RGB") clips at 255, so scale
        wide = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except _TooSmall as e:
    raise ValueError(str(e)) from None
  except Image.DecompressionBombError as e:
    raise ValueError(f"{path}: refused, too many pixels to decode safely ({e})") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot read image ({e})") from e


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> its centre square resized to float32 [size, size, 3] in [-1, 1]."""
  height, width = rgb.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  im = Image.fromarray(rgb[top:top + side, left:left + side]).resize((size, size),
                                                                     Image.BICUBIC)
  return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def read_image(path: str, size: int, min_side: int = 1) -> np.ndarray:
  """`read_rgb`, centre-cropped to a square and resized -> float32 [size, size, 3] in
  [-1, 1]; the same errors."""
  return square_resize(read_rgb(path, min_side), size)


class _TooSmall(Exception):
  """Raised inside read_rgb's try block, re-raised as ValueError without re-wrapping."""


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] [..., H, W, 3] -> uint8."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid_image(images, rows: int, upscale: int = 1) -> np.ndarray:
  """Images [N, H, W, 3] in [-1, 1] -> one uint8 grid [rows * H * up, cols * W * up, 3]
  of `rows` rows (N must divide), nearest-neighbour upscaled."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = n // rows
  grid = images[: rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * h, cols * w, c)
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  return grid


def save_grid(images, path: str, rows: int, upscale: int = 1) -> None:
  """Images [N, H, W, 3] in [-1, 1] -> one PNG grid of `rows` rows (N must divide)."""
  im = Image.fromarray(grid_image(images, rows, upscale))
  with atomic_path(path) as tmp:
    im.save(tmp, format="PNG")


def labelled_rows(rows, labels, upscale: int = 1, label_width: int = 0) -> np.ndarray:
  """Rows of images (each [N, H, W, 3] in [-1, 1], the same N) -> one uint8 image with
  each row's label written on a white band to its left."""
  from PIL import ImageDraw
  grid = grid_image(np.concatenate(rows), rows=len(rows), upscale=upscale)
  row_height = grid.shape[0] // len(rows)
  width = label_width or 6 * max(len(label) for label in labels) + 12  # default font ~6 px
  canvas = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
  canvas.paste(Image.fromarray(grid), (width, 0))
  draw = ImageDraw.Draw(canvas)
  for i, label in enumerate(labels):
    draw.text((6, i * row_height + row_height // 2 - 6), label, fill="black")
  return np.asarray(canvas)
