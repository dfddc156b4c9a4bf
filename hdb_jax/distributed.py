"""Multi-process JAX (TPU pods, multi-host GPU, several processes on one CPU machine)."""

from __future__ import annotations

import jax


def initialize(cfg) -> None:
  """`jax.distributed.initialize` from a config's `distributed` block.

  cfg.initialize False: single process, nothing to do. With no coordinator address the
  cluster is auto-detected (TPU pods, SLURM); otherwise coordinator_address,
  num_processes and process_id are used. cpu_collectives="gloo" lets processes on CPUs
  exchange data (tests of multi-host code on one machine).
  """
  if not cfg.initialize:
    return
  if cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)
