"""Hypernetwork training across processes, as a pod runs it: train/train_hypernet.py in 2
processes x 2 host devices, jax.distributed over gloo on 127.0.0.1 (tests/test_preopt.py's
pattern), against 1 process x 4 devices.

One 2-process job serves every assertion (each launch costs tens of seconds here). It
splits the frozen base along `fsdp` (mesh data=2 x fsdp=2, large arrays halved) while the
1-process reference keeps it replicated; process 1 is killed with SIGKILL after the first
checkpoint, and the same command on both processes then resumes and finishes. Its weights
equal the uninterrupted, replicated 1-process run's to float tolerance: that one
comparison holds "2 x 2 == 1 x 4", "resumed == uninterrupted" and "fsdp == replicated"
together (any of them wrong moves the weights far past the tolerance). Around it:
- the survivor of the kill exits with an error within STOP_WITHIN s (no hang), and
  nothing is published;
- the rerun resumes from the last complete checkpoint (it says which, and it is one the
  killed job wrote);
- each process reads the photos of only its rows of every global batch: counted per step
  from the `--log_reads` files, the two processes' rows are disjoint, half the batch
  each, and together exactly the identities the 1-process run read;
- the fsdp split really split arrays (the trainer logs how many);
- the held-out evaluation during training runs in both processes.

The small model, data and stand-in targets of test_hypernet_train.py, 6 steps. Both runs
share this session's XLA compilation cache (JAX_COMPILATION_CACHE_DIR, tests/conftest.py):
the rerun loads the programs the killed job compiled.

Tolerance: 2.2e-6 measured (other compiled programs: the cross-process all-reduce and
fsdp's all-gathers sum in another order); the check allows 1e-4, an order of magnitude
under what one AdamW step moves a value (lr = 1e-3).
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from tests.test_hypernet_train import (RUN, _assert_same_params, _launch,  # noqa: F401
                                       _steps_saved, stand_in)

STEPS = 6
MULTI = {**RUN, "train.steps": STEPS, "train.checkpoint_every": 2}
READS = ["--log_reads"]  # each process appends the rows it read to reads-p<process>.jsonl
FSDP = {"mesh.fsdp": 2, "mesh.fsdp_min_size": 1024}  # the small model's arrays are small
# The held-out evaluation at the last step, as the SD1.5 configs run it during training:
# every process takes part (the frozen base is split over processes' devices).
EVAL = {"train.eval_every": STEPS, "train.eval_identities": 2, "train.eval_samples": 1,
        "train.sample_steps": 2}
OTHER_PROGRAM_ATOL = 1e-4
TIMEOUT = 1200         # seconds for a whole launch on a loaded 2-core machine (a hang bound)
STOP_WITHIN = 150      # seconds for the survivor of a SIGKILL to exit


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(workdir, stand_in):
  """Both processes of one 2 x 2 job (a new coordinator port per job)."""
  port = _free_port()
  return [_launch(workdir, {**MULTI, **FSDP, **EVAL, **stand_in,
                            "distributed.initialize": True,
                            "distributed.cpu_collectives": "gloo",
                            "distributed.coordinator_address": f"127.0.0.1:{port}",
                            "distributed.num_processes": 2,
                            "distributed.process_id": i}, devices=2, args=READS)
          for i in range(2)]


def _communicate(processes, timeout):
  """Outputs of every process; any still running after `timeout` s is killed."""
  outs = []
  try:
    for process in processes:
      outs.append(process.communicate(timeout=timeout)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  return outs


def _reads(workdir, process):
  """{step: (rows, identities)} of one process; a step read again after a resume keeps
  its last reading (the one whose update survived)."""
  with open(os.path.join(workdir, f"reads-p{process}.jsonl")) as f:
    return {r["step"]: (r["rows"], r["identities"]) for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def four_device_run(tmp_path_factory, stand_in):
  """1 process x 4 devices, the frozen base replicated, uninterrupted."""
  workdir = tmp_path_factory.mktemp("hypernet_4")
  out, = _communicate([_launch(workdir, {**MULTI, **stand_in}, devices=4, args=READS)],
                      TIMEOUT)
  assert "frozen base: 0 of" in out, out[-3000:]
  return str(workdir)


@pytest.mark.slow  # launches 5 processes (~2-4 min on 2 cores): .ci/run runs it after
def test_two_processes_killed_and_resumed_equal_one_uninterrupted(tmp_path, stand_in,
                                                                  four_device_run):
  assert os.path.isdir(os.path.join(four_device_run, "hypernet"))
  batch_size = MULTI["train.batch_size"]

  # The 2 x 2 job; SIGKILL process 1 once the first checkpoint is complete (orbax renames
  # a checkpoint's folder into place when every process has written its part).
  processes = _launch_two(tmp_path, stand_in)
  try:
    while all(p.poll() is None for p in processes) and not _steps_saved(tmp_path):
      time.sleep(0.02)
    assert all(p.poll() is None for p in processes), "a process ended before the kill"
    processes[1].send_signal(signal.SIGKILL)
    began = time.time()
    try:
      survivor = processes[0].communicate(timeout=STOP_WITHIN)[0]
    except subprocess.TimeoutExpired:
      pytest.fail(f"process 0 still running {STOP_WITHIN} s after process 1 was killed")
    stopped_after = time.time() - began
  finally:
    _communicate(processes, 1)
  print(f"process 0 exited {processes[0].returncode} {stopped_after:.1f} s after the kill")
  assert processes[0].returncode != 0, survivor[-3000:]
  assert not os.path.exists(os.path.join(tmp_path, "hypernet"))
  assert "frozen base: 0 of" not in survivor and "split over fsdp" in survivor, survivor[-3000:]
  saved = _steps_saved(tmp_path)
  assert saved and saved[-1] < STEPS, saved

  # The same command on both processes: resumes from the last complete checkpoint.
  outs = _communicate(_launch_two(tmp_path, stand_in), TIMEOUT)
  for out in outs:
    assert f"step {STEPS}: held-out identity accuracy" in out, out[-3000:]
    resumed = re.search(r"resuming from the checkpoint of step (\d+)", out)
    assert resumed and int(resumed.group(1)) == saved[-1], out[-3000:]
    rest = STEPS - saved[-1]
    assert (f"read the photos of {rest * batch_size // 2} of {rest * batch_size} batch "
            f"rows") in out, out[-3000:]
  _assert_same_params(four_device_run, tmp_path, OTHER_PROGRAM_ATOL)

  # Every global batch: the processes read disjoint halves, together the 1-process rows.
  one, first, second = (_reads(four_device_run, 0), _reads(tmp_path, 0),
                        _reads(tmp_path, 1))
  assert sorted(one) == sorted(first) == sorted(second) == list(range(STEPS))
  for step in range(STEPS):
    rows, identities = one[step]
    assert rows == list(range(batch_size))
    (rows_0, ids_0), (rows_1, ids_1) = first[step], second[step]
    assert len(rows_0) == len(rows_1) == batch_size // 2, step
    assert sorted(rows_0 + rows_1) == rows, step          # none missing, none twice
    assert [identities[r] for r in rows_0] == ids_0, step
    assert [identities[r] for r in rows_1] == ids_1, step
