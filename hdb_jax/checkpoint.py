"""Orbax checkpoints of a training state pytree under `<workdir>/checkpoints`.

Rerunning the same command resumes from the newest complete checkpoint; orbax writes
each step to a temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
