r"""Pre-optimization throughput and memory: vmapped blocks vs a one-identity-at-a-time loop.

    python benchmarks/preopt.py --config configs/preopt_mini.py:tiny --out docs/preopt_benchmark.json
    python benchmarks/preopt.py --config configs/preopt_mini.py        # the mini base, when committed

One process, one device. Every measurement runs in a fresh child process, so that its
peak memory is its own: "peak RSS" is the resident set's high-water mark while the timed
steps run (reset after compilation via /proc/self/clear_refs, so XLA's compiler memory
is not counted); "XLA peak" is the compiled step's arguments + outputs + temporaries
(what an accelerator would have to hold). Timings exclude compilation and the (once per
block) VAE encoding; the CPU is shared, so each row keeps its best of 3 timing windows
and of `--rounds` interleaved runs. Rows:
  loop      train/lidb_dreambooth's step (lidb.merge + loss, one jit call per step), one
            identity after the other: what a port of the per-subject code does
  block G   hdb_jax/preopt.py: G identities in one jit call per step, residuals applied by
            the low-rank side path or by vmap of lidb.merge; 'side:G:D' splits the block
            over D host devices of the process (the mesh's data axis)
  shared B  one LiDB for a batch of B examples (train/lidb_dreambooth's step): the
            most batching can give on this machine, with no per-identity part
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

config_flags.DEFINE_config_file("config", None, "Config file (configs/preopt_*.py).")
flags.DEFINE_list("blocks", ["1", "4", "16"], "Identities per block to measure.")
flags.DEFINE_list("residuals", ["side", "merge"], "Residual strategies to measure.")
flags.DEFINE_list("extra", ["shared:16", "side:16:2"],
                  "More rows: 'shared:B' (one LiDB for a batch of B: the batching ceiling), "
                  "'side:G:D' (block G over D host devices of this process).")
flags.DEFINE_float("min_seconds", 9.0, "Time each measurement for at least this long.")
flags.DEFINE_integer("rounds", 2, "Measure every row this many times (interleaved); keep "
                     "the best.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("child", "", "Internal: run one measurement ('loop' or 'side:16').")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _rss_peak_reset():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)


def _rss_peak_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(call, min_seconds: float, windows: int = 3) -> float:
  """Calls per second of `call()` (returns something to block on): the best of `windows`
  windows of min_seconds / windows each (the CPU is shared: the best window is the one
  least disturbed by other processes)."""
  import jax
  jax.block_until_ready(call())  # warm-up
  _rss_peak_reset()
  rates = []
  for _ in range(windows):
    calls, start = 0, time.perf_counter()
    while True:
      out = call()
      calls += 1
      if calls % 4 == 0:  # bound the work queued by async dispatch
        jax.block_until_ready(out)
      if calls >= 3 and time.perf_counter() - start >= min_seconds / windows:
        jax.block_until_ready(out)
        rates.append(calls / (time.perf_counter() - start))
        break
  return max(rates)


def measure(config, what: str, min_seconds: float) -> dict:
  import jax
  import numpy as np
  import optax
  from hdb_jax import dreambooth, lidb, models, params as params_lib, preopt
  run = config.preopt
  sd, frozen = models.load_or_build(config.model)
  spec = lidb.make_spec(frozen, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  aux = lidb.make_aux(spec)
  input_ids = sd.tokenize([config.prompt.format(token=config.token,
                                                class_name=config.class_name)])
  optimizer = optax.adam(run.learning_rate)
  result = {"what": what, "batch_size_per_identity": run.batch_size,
            "frozen_mb": params_lib.count(frozen) * 4 / 2**20,
            "lidb_values": spec.num_trainable}

  if what.startswith("shared:"):  # the ceiling: one LiDB for a whole batch, no per-identity part
    batch = int(what.split(":")[1])
    step_fn = dreambooth.make_train_step(sd, optimizer, batch * run.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    pools = (dreambooth.make_pool(dreambooth.encode_subject(
        sd, frozen["vae"], images.astype(np.float32) / 127.5 - 1, run.hflip), input_ids, 1.0),)
    carry = [lidb.init(spec, jax.random.key(0))]
    carry.append(optimizer.init(carry[0]))
    state = {"step": 0}

    def call():
      carry[0], carry[1], loss = step_fn(carry[0], carry[1], frozen, aux, pools,
                                         jax.random.key(state["step"]))
      state["step"] += 1
      return loss
    lowered = step_fn.lower(*carry, frozen, aux, pools, jax.random.key(0))
    identity_steps_per_call = batch
  elif what == "loop":
    step_fn = dreambooth.make_train_step(sd, optimizer, run.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32, 3), dtype=np.uint8)
    pools = [(dreambooth.make_pool(dreambooth.encode_subject(
        sd, frozen["vae"], im.astype(np.float32) / 127.5 - 1, run.hflip), input_ids, 1.0),)
             for im in images]
    state = {"i": 0, "step": 0}
    trains = [lidb.init(spec, jax.random.key(i)) for i in range(len(pools))]
    opts = [optimizer.init(t) for t in trains]

    def call():  # one step of one identity; the identities take turns every 10 steps
      i = (state["step"] // 10) % len(pools)
      trains[i], opts[i], loss = step_fn(trains[i], opts[i], frozen, aux, pools[i],
                                         jax.random.fold_in(jax.random.key(i), state["step"]))
      state["step"] += 1
      return loss
    lowered = step_fn.lower(trains[0], opts[0], frozen, aux, pools[0], jax.random.key(0))
    identity_steps_per_call = 1
  else:
    residual, block, *devices = what.split(":")
    block, devices = int(block), int(devices[0]) if devices else 1
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    fns = preopt.make_block_fns(sd, spec, optimizer, mesh, seed=run.seed,
                                batch_size=run.batch_size,
                                residual=residual, hflip=run.hflip)
    identities = np.arange(block, dtype=np.int32)
    images = np.random.default_rng(0).integers(0, 256, (block, 1, 32, 32, 3), dtype=np.uint8)
    pool = fns.encode(frozen["vae"], images, np.broadcast_to(input_ids[None], (block, 1) + input_ids.shape[1:]), None)
    carry = list(fns.init(identities))
    state = {"step": 0}

    def call():
      carry[0], carry[1], losses = fns.train(carry[0], carry[1], frozen, aux, pool,
                                             identities, np.int32(state["step"]))
      state["step"] += 1
      return losses
    lowered = fns.train.lower(*carry, frozen, aux, pool, identities, np.int32(0))
    identity_steps_per_call = block
    result["block"] = block
    result["residual"] = residual
    result["devices"] = devices

  start = time.perf_counter()
  memory = lowered.compile().memory_analysis()
  result["compile_seconds"] = time.perf_counter() - start
  calls_per_second = _timed(call, min_seconds)
  result["identity_steps_per_second"] = calls_per_second * identity_steps_per_call
  result["ms_per_call"] = 1000 / calls_per_second
  result["peak_rss_mb"] = _rss_peak_mb()
  if memory is not None:
    result["xla_peak_mb"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                             + memory.temp_size_in_bytes
                             - memory.alias_size_in_bytes) / 2**20
    result["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
  return result


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.child:
    print("RESULT " + json.dumps(measure(config, FLAGS.child, FLAGS.min_seconds)), flush=True)
    return
  whats = ["loop"] + [f"{r}:{b}" for r in FLAGS.residuals for b in FLAGS.blocks] + FLAGS.extra
  results = []
  config_args = [f"--config={config_flags.get_config_filename(FLAGS['config'])}"] + [
      f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
      for k, v in config_flags.get_override_values(FLAGS["config"]).items()]
  for what in [w for _ in range(FLAGS.rounds) for w in whats]:
    devices = int(what.split(":")[2]) if what.count(":") == 2 else 1
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *config_args,
                          f"--child={what}", f"--min_seconds={FLAGS.min_seconds}"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
      sys.exit(f"benchmark {what} failed:\n{out.stderr[-3000:]}")
    results.append(json.loads(line[0][len("RESULT "):]))
    r = results[-1]
    print(f"{what:>10}: {r['identity_steps_per_second']:7.1f} identity-steps/s  "
          f"{r['ms_per_call']:8.1f} ms/call  peak RSS {r['peak_rss_mb']:7.0f} MB  "
          f"XLA peak {r.get('xla_peak_mb', float('nan')):6.1f} MB  "
          f"compile {r['compile_seconds']:5.1f} s", flush=True)
  best = {}  # best round of each row
  for r in results:
    if r["what"] not in best or (r["identity_steps_per_second"]
                                 > best[r["what"]]["identity_steps_per_second"]):
      best[r["what"]] = r
  results = [best[w] for w in whats]
  loop = best["loop"]["identity_steps_per_second"]
  for r in results:
    r["speedup_vs_loop"] = r["identity_steps_per_second"] / loop
  summary = {"command": " ".join(["python benchmarks/preopt.py"] + sys.argv[1:]),
             "load_average_after": os.getloadavg()[0], "cpu_count": os.cpu_count(),
             "results": results}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  app.run(main)
