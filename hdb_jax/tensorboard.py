"""TensorBoard event files without TensorFlow (tensorboardX writes the protocol buffers).

    writer = tensorboard.Writer(logdir)
    writer.scalars(step, {"loss": 0.1, "grad_norm": 2.0})
    writer.image(step, "samples", grid_uint8)     # [H, W, 3]
    writer.close()

Read them with `tensorboard --logdir DIR`, or `tensorboard.read_scalars(DIR)` in tests.
"""

from __future__ import annotations

import glob
import os

import numpy as np


class Writer:
  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter
    os.makedirs(logdir, exist_ok=True)
    self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, values: dict) -> None:
    for name, value in values.items():
      self._writer.add_scalar(name, float(value), global_step=step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """One uint8 image [H, W, 3]."""
    self._writer.add_image(name, np.asarray(image, np.uint8), global_step=step,
                           dataformats="HWC")

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every scalar in the event files under `logdir`.

  tensorboardX only writes; TensorBoard's own reader (EventAccumulator) would bring the
  whole `tensorboard` package for this. An event file is a sequence of TFRecords, read
  here with tensorboardX's Event protocol buffer (CRCs not checked)."""
  from tensorboardX.proto import event_pb2
  import struct
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                               recursive=True)):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
