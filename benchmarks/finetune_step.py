r"""The finetune step, hdb-jax against the PyTorch route: time, FLOPs and peak memory.

    python benchmarks/finetune_step.py --models mini,tiny --rounds 5 \
        --out benchmarks/results/finetune_step.json
    python benchmarks/finetune_step.py --models sd15 --methods lora4,lora4-side \
        --rounds 2 --sequential --min_steps 2 --window_seconds 1 --profile_steps 1 \
        --out benchmarks/results/finetune_step_sd15.json

One training step of a personalization, text encoder included, on the same batch, at the
same resolution and from the same weights on both sides (issue "Performance", a, d, e):

  JAX      hdb-jax's jitted steps. `lidb1`: dreambooth.make_train_step (the step of
           train.lidb_dreambooth: LiDB rank 1 merged into the kernels); `lora4`:
           finetune.make_step (the step of `hdb personalize`: a rank-relaxed LoRA, r' = 4,
           merged). `lidb1-side`, `lora4-side`: the same losses with the residuals on the
           low-rank side path (`preopt.low_rank_side_path`, x @ K + (x @ down) @ up).
  PyTorch  what public HyperDreamBooth ports run: a diffusers UNet2DConditionModel and a
           transformers CLIPTextModel with peft LoRA adapters, rank 1 (against lidb1) or
           4 (against lora4), on the layers hdb-jax targets (UNet attn1 / attn2 to_q,
           to_k, to_v, to_out.0; CLIP self_attn q_proj, k_proj, v_proj, out_proj);
           torch.optim.AdamW; epsilon loss; torch.set_num_threads(2).

Both sides: AdamW (same rate and weight decay), fp32, batches drawn from a pool of 2
latents (a photo and its mirror image) with the prompt "a sks face", noise and timesteps
drawn inside the step. The model's weights are written once as a diffusers PyTorch folder
(`export_torch`, with hdb_jax.torch_export's key mapping); before timing, each worker
computes the loss of a fixed batch (same latents, noise, timesteps), which must agree
between the sides: the same model, the same loss.

Every (method, side) runs in its own worker process, set up once (weights, compilation,
two warm-up steps), so that its peak resident memory is its own: over its life, and while
its windows ran (reset after the setup through /proc/self/clear_refs). Rounds are
interleaved: in each round every worker times one window of steps (at least
--window_seconds and --min_steps; JAX keeps one step in flight, as a training loop does),
the order of the sides alternating between rounds, so both sides saw the same load from
other processes. Reported per row: the median over the rounds and the best round (the
one least disturbed by other processes). A `peak` worker times a 2048 x 2048 fp32 matmul
(NumPy, JAX, PyTorch) and a 256 MB copy in every round: the CPU's measured peak is the
best library's median.

FLOPs: XLA's cost analysis of the compiled JAX step ('flops', 'bytes accessed'); for the
PyTorch step, `torch.utils.flop_counter.FlopCounterMode` over one step (matmuls,
convolutions and attention only). "% of peak" divides the XLA FLOPs of the method's JAX
step (merge path) by each side's time: the same work for both sides. After its setup,
each JAX worker traces --profile_steps steps with the profiler (`kernel_profile`): how
many kernels a step runs and where their time goes.

Here: the flags, the workers' protocol, the rounds and the report. The workers are beside
it: `finetune_jax.py` (the models, the PyTorch folder and batches, the JAX steps and their
profile) and `finetune_torch.py` (the PyTorch route, the matmul peak).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# The workers, beside this file: the models and JAX side, and the PyTorch side.
import finetune_jax  # noqa: E402
from finetune_jax import METHODS, read_json, rss_mb, rss_peak_reset  # noqa: E402

flags.DEFINE_list("models", ["mini", "tiny"], "Models: mini (the committed base), tiny "
                  "(random init), sd15 (SD1.5's architecture, random init, reduced resolution).")
flags.DEFINE_list("methods", ["lidb1", "lora4", "lidb1-side", "lora4-side"],
                  f"JAX steps to time, of {sorted(METHODS)}; the PyTorch side runs the "
                  "rank-1 and rank-4 LoRA steps they map to.")
flags.DEFINE_list("sides", ["jax", "torch"], "Sides to run.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds; every worker times one window per round.")
flags.DEFINE_float("window_seconds", 3.0, "Minimum length of a timing window.")
flags.DEFINE_integer("min_steps", 5, "Minimum steps of a timing window.")
flags.DEFINE_integer("batch_size", 0, "Examples per step; 0: the model's (mini, tiny: 4 as "
                     "train.lidb_dreambooth and `hdb personalize`; sd15: 1).")
flags.DEFINE_integer("sd15_latent_size", 32, "SD1.5 latent side (32: 256 px images).")
flags.DEFINE_float("learning_rate", 1e-4, "AdamW rate, both sides.")
flags.DEFINE_float("weight_decay", 1e-2, "AdamW weight decay, both sides (torch's default).")
flags.DEFINE_bool("sequential", False, "Run the workers one after the other (each its rounds "
                  "in a row) instead of all alive at once: for models whose workers do not "
                  "fit in memory together (sd15). No interleaving then.")
flags.DEFINE_integer("profile_steps", 10, "JAX: steps traced by the profiler after the "
                     "setup, for the kernel breakdown (0: none).")
flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS for the JAX workers (experiments).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("child", "", "Internal: 'export', 'peak' or '<side>:<method>'.")
flags.DEFINE_string("model", "", "Internal: the worker's model.")
flags.DEFINE_string("work", "", "Internal: the run's scratch folder.")
FLAGS = flags.FLAGS


def run_child():
  """A worker: set up, print READY, then answer 'window' / 'quit' lines on stdin."""
  if FLAGS.child == "export":
    info = finetune_jax.run_export(FLAGS.model, FLAGS.work)
    with open(os.path.join(FLAGS.work, "export.json"), "w") as f:
      json.dump(info, f)
    return
  if FLAGS.child == "peak":
    import finetune_torch
    worker = finetune_torch.PeakWorker("", "", "")
  elif FLAGS.child.startswith("jax:"):
    worker = finetune_jax.JaxWorker(FLAGS.model, FLAGS.child.split(":")[1], FLAGS.work)
  else:
    import finetune_torch
    worker = finetune_torch.TorchWorker(FLAGS.model, FLAGS.child.split(":")[1], FLAGS.work)
  worker.result["rss_after_setup_mb"] = rss_mb("VmRSS")
  # The setup's peak (imports, weights, compilation, warm-up); then the windows' own.
  worker.result["setup_peak_rss_mb"] = rss_mb("VmHWM")
  rss_peak_reset()
  print("READY " + json.dumps(worker.result), flush=True)
  for line in sys.stdin:
    if line.strip() == "window":
      print("WINDOW " + json.dumps(worker.window(FLAGS.window_seconds, FLAGS.min_steps)),
            flush=True)
    else:
      break
  print("DONE " + json.dumps({"steps_peak_rss_mb": rss_mb("VmHWM")}), flush=True)


# ------------------------------------------------------------------------------------
# The parent: start the workers, interleave the rounds, summarize

class Child:
  """A worker process and its line protocol (READY, WINDOW, DONE lines on its stdout)."""

  def __init__(self, what: str, model: str, work: str):
    self.what = what
    env = dict(os.environ)
    if what.startswith("jax:") and FLAGS.xla_flags:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
    self.log_path = os.path.join(work, what.replace(":", "_") + ".log")
    self.log = open(self.log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--child={what}", f"--model={model}",
         f"--work={work}", f"--window_seconds={FLAGS.window_seconds}",
         f"--min_steps={FLAGS.min_steps}", f"--batch_size={FLAGS.batch_size}",
         f"--sd15_latent_size={FLAGS.sd15_latent_size}",
         f"--learning_rate={FLAGS.learning_rate}", f"--weight_decay={FLAGS.weight_decay}",
         f"--profile_steps={FLAGS.profile_steps}"],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
        text=True)

  def read(self, prefix: str) -> dict:
    for line in self.process.stdout:
      if line.startswith(prefix + " "):
        return json.loads(line[len(prefix) + 1:])
    self.process.wait()
    with open(self.log_path) as f:
      raise RuntimeError(f"worker {self.what} failed (exit {self.process.returncode}):\n"
                         f"{f.read()[-4000:]}")

  def ask(self, command: str, prefix: str) -> dict:
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self.read(prefix)

  def close(self) -> dict:
    """Quit -> {"steps_peak_rss_mb"}: the peak resident memory while the windows ran."""
    done = self.ask("quit", "DONE")
    self.process.stdin.close()
    status = self.process.wait()
    self.log.close()
    if status:
      raise RuntimeError(f"worker {self.what} exited with status {status}")
    return done


def machine_info() -> dict:
  import diffusers
  import jax
  import jaxlib
  import numpy as np
  import peft
  import torch
  import transformers
  import flax
  import optax
  processor = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    processor = names[0] if names else processor
  except OSError:
    pass
  return {"cpus": os.cpu_count(), "processor": processor, "python": platform.python_version(),
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "flax": flax.__version__, "optax": optax.__version__,
                       "numpy": np.__version__, "torch": torch.__version__,
                       "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__, "peft": peft.__version__}}


def measure_model(name: str, methods: list, work_root: str, peak: Child) -> dict:
  """Export the model, run its workers for FLAGS.rounds interleaved rounds -> its results."""
  work = os.path.join(work_root, name)
  os.makedirs(work)
  started = time.perf_counter()
  export = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child=export", f"--model={name}",
       f"--work={work}", f"--batch_size={FLAGS.batch_size}",
       f"--sd15_latent_size={FLAGS.sd15_latent_size}"],
      cwd=REPO, capture_output=True, text=True)
  if export.returncode:
    raise RuntimeError(f"export of {name} failed:\n{export.stderr[-4000:]}")
  info = read_json(os.path.join(work, "export.json"))
  print(f"[{name}] exported in {time.perf_counter() - started:.0f} s: batch "
        f"{info['batch_size']}, latents {info['latent_shape']}, {info['text_length']} tokens",
        flush=True)

  rows = []  # (side, method): JAX methods as asked, PyTorch the ranks they map to
  if "jax" in FLAGS.sides:
    rows += [("jax", m) for m in methods]
  if "torch" in FLAGS.sides:
    rows += [("torch", t) for t in dict.fromkeys(METHODS[m][0] for m in methods)]
  setups, windows, closes = {}, {row: [] for row in rows}, {}
  peak_windows, copy_windows = [], []

  def start(row):
    child = Child(f"{row[0]}:{row[1]}", name, work)
    setups[row] = child.read("READY")
    print(f"[{name}] {row[0]:5s} {row[1]:10s} ready: {json.dumps(setups[row])}", flush=True)
    return child

  def time_window(row, child, round_index):
    result = child.ask("window", "WINDOW")
    windows[row].append(result)
    print(f"[{name}] round {round_index + 1} {row[0]:5s} {row[1]:10s} "
          f"{result['ms_per_step']:9.2f} ms/step ({result['steps']} steps)", flush=True)

  def time_peak():
    result = peak.ask("window", "WINDOW")
    peak_windows.append(result["gflops"])
    copy_windows.append(result["copy_gb_per_second"])
    print(f"[{name}] matmul GFLOP/s " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["gflops"].items())
          + f"; copy {result['copy_gb_per_second']:.1f} GB/s", flush=True)

  if FLAGS.sequential:
    for row in rows:
      child = start(row)
      for round_index in range(FLAGS.rounds):
        time_window(row, child, round_index)
        time_peak()
      closes[row] = child.close()
  else:
    children = {row: start(row) for row in rows}
    for round_index in range(FLAGS.rounds):
      # Alternate the sides' order between rounds: [jax rows, torch rows], then reversed.
      order = rows if round_index % 2 == 0 else rows[::-1]
      for row in order:
        time_window(row, children[row], round_index)
      time_peak()
    for row, child in children.items():
      closes[row] = child.close()

  peak_gflops = {lib: statistics.median(w[lib] for w in peak_windows)
                 for lib in peak_windows[0]}
  peak_best = max(peak_gflops.values())
  results = []
  for side, method in rows:
    ms = [w["ms_per_step"] for w in windows[(side, method)]]
    row = {"side": side, "method": method, "ms_per_step_median": statistics.median(ms),
           "ms_per_step_best": min(ms), "ms_per_step": ms, **setups[(side, method)],
           **closes[(side, method)],
           "last_loss": windows[(side, method)][-1]["last_loss"]}
    # Peak resident memory of the process over its life (imports, weights, compilation,
    # steps). The peak is reset after the setup (/proc/self/clear_refs): ru_maxrss would
    # give the windows' peak only.
    row["process_peak_rss_mb"] = max(row["setup_peak_rss_mb"], row["steps_peak_rss_mb"])
    results.append(row)
  by_row = {(r["side"], r["method"]): r for r in results}
  for r in results:
    base_method = METHODS[r["method"]][0]
    jax_merge = by_row.get(("jax", base_method))
    if jax_merge is not None:  # the same work for both sides: the merge step's XLA FLOPs
      r["work_gflop"] = jax_merge["xla_flops"] / 1e9
      r["gflops_per_second"] = r["work_gflop"] / (r["ms_per_step_median"] / 1e3)
      r["percent_of_matmul_peak"] = 100 * r["gflops_per_second"] / peak_best
    if "xla_flops" in r:
      r["own_gflop"] = r["xla_flops"] / 1e9
      r["own_gflops_per_second"] = r["own_gflop"] / (r["ms_per_step_median"] / 1e3)
      r["own_percent_of_matmul_peak"] = 100 * r["own_gflops_per_second"] / peak_best
      r["arithmetic_intensity_flop_per_byte"] = r["xla_flops"] / r["xla_bytes_accessed"]
      r["xla_bytes_gb_per_second"] = r["xla_bytes_accessed"] / 1e9 / (
          r["ms_per_step_median"] / 1e3)
    if "torch_flops" in r:
      r["own_gflop"] = r["torch_flops"] / 1e9
    torch_row = by_row.get(("torch", base_method))
    if r["side"] == "jax" and torch_row is not None:
      r["speedup_over_torch"] = torch_row["ms_per_step_median"] / r["ms_per_step_median"]
      # The round least disturbed by other processes, on each side.
      r["speedup_over_torch_best"] = torch_row["ms_per_step_best"] / r["ms_per_step_best"]
      r["speedup_over_torch_per_round"] = [
          t["ms_per_step"] / j["ms_per_step"]
          for t, j in zip(windows[("torch", base_method)], windows[("jax", r["method"])])]
  check = {m: {s: by_row[(s, m)]["check_loss"] for s in ("jax", "torch") if (s, m) in by_row}
           for m in dict.fromkeys(METHODS[m][0] for m in methods)}
  return {"batch_size": info["batch_size"], "latent_shape": info["latent_shape"],
          "text_length": info["text_length"], "unet_params": info["unet_params"],
          "text_encoder_params": info["text_encoder_params"],
          "matmul_gflops_median": peak_gflops, "matmul_peak_gflops": peak_best,
          "matmul_gflops_per_round": peak_windows,
          "copy_gb_per_second_median": statistics.median(copy_windows),
          "check_loss": check, "rows": results}


def print_table(name: str, summary: dict) -> None:
  """The model's rows: times, speed-ups, FLOPs, peak memory; then the kernel breakdown."""
  nan = float("nan")
  print(f"\n{name}: batch {summary['batch_size']}, latents {summary['latent_shape']}, "
        f"{summary['text_length']} tokens; matmul peak {summary['matmul_peak_gflops']:.0f} "
        "GFLOP/s (" + ", ".join(f"{k} {v:.0f}" for k, v in
                                summary["matmul_gflops_median"].items()) + ")")
  print(f"{'method':11s} {'side':5s} {'ms/step':>9s} {'speedup':>8s} {'best':>9s} {'speedup':>8s} "
        f"{'GFLOP':>7s} {'GFLOP/s':>8s} {'%peak':>6s} {'own GFLOP':>9s} {'RSS MB':>7s} "
        f"{'steps RSS':>9s}")
  for r in summary["rows"]:
    speedup = f"{r['speedup_over_torch']:.2f}x" if "speedup_over_torch" in r else ""
    best = f"{r['speedup_over_torch_best']:.2f}x" if "speedup_over_torch_best" in r else ""
    print(f"{r['method']:11s} {r['side']:5s} {r['ms_per_step_median']:9.2f} {speedup:>8s} "
          f"{r['ms_per_step_best']:9.2f} {best:>8s} "
          f"{r.get('work_gflop', nan):7.3f} {r.get('gflops_per_second', nan):8.1f} "
          f"{r.get('percent_of_matmul_peak', nan):6.1f} "
          f"{r.get('own_gflop', nan):9.3f} {r['process_peak_rss_mb']:7.0f} "
          f"{r['steps_peak_rss_mb']:9.0f}")
  print("check loss (fixed batch, zero residual): " + json.dumps(summary["check_loss"]))
  for r in summary["rows"]:
    profile = r.get("kernel_profile")
    if profile:
      print(f"{r['method']:11s} kernels: {profile['kernels_per_step']:.0f} per step, "
            f"{profile['kernel_ms_per_step']:.2f} ms of {profile['wall_ms_per_step']:.2f} ms "
            "(profiled, each step waited for); " + ", ".join(
                f"{k} {v['kernels_per_step']:.0f} x {v['median_us']:.1f} us median = "
                f"{v['ms_per_step']:.2f} ms" for k, v in profile["categories"].items()))


def main(argv):
  del argv
  if FLAGS.child:
    run_child()
    return
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    raise app.UsageError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
  from hdb_jax import files
  report = {"command": files.portable_command(
                ["python", os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:],
                REPO),
            "machine": machine_info(), "load_average_before": list(os.getloadavg()),
            "rounds": FLAGS.rounds, "window_seconds": FLAGS.window_seconds,
            "min_steps": FLAGS.min_steps, "interleaved": not FLAGS.sequential,
            "learning_rate": FLAGS.learning_rate, "weight_decay": FLAGS.weight_decay,
            "xla_flags": FLAGS.xla_flags, "models": {}}
  work_root = tempfile.mkdtemp(prefix="hdb-bench-finetune-")
  peak = Child("peak", "", work_root)
  peak.read("READY")
  try:
    for name in FLAGS.models:
      report["models"][name] = measure_model(name, FLAGS.methods, work_root, peak)
      print_table(name, report["models"][name])
  finally:
    peak.close()
    import shutil
    shutil.rmtree(work_root, ignore_errors=True)
  report["load_average_after"] = list(os.getloadavg())
  if FLAGS.out:
    files.write_json(FLAGS.out if os.path.isabs(FLAGS.out) else os.path.join(REPO, FLAGS.out),
                     report)


if __name__ == "__main__":
  app.run(main)