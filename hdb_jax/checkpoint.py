"""Orbax checkpoints of a training state pytree under `<workdir>/checkpoints`.

Rerunning the same command resumes from the newest complete checkpoint; orbax writes
each step to a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import signal

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def manager(workdir: str, max_to_keep: int = 2,
            subdir: str = "checkpoints") -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), subdir)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def restore_latest(mngr: ocp.CheckpointManager, state):
  """(step, state) from the newest checkpoint, or (0, state) when there is none.

  `state` gives the tree structure, shapes and dtypes to restore into.
  """
  step = mngr.latest_step()
  if step is None:
    return 0, state
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def save(mngr: ocp.CheckpointManager, step: int, state, wait: bool = False) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  if wait:
    mngr.wait_until_finished()


class StopFlag:
  """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

  def restore(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: checkpointing at the next step boundary", signum)
    self.requested = True

  def agreed(self) -> bool:
    """True when any process was asked to stop (all processes must stop together)."""
    if jax.process_count() == 1:
      return self.requested
    flags_all = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.asarray(flags_all).any())
