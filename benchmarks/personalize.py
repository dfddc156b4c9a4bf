r"""`hdb personalize` end to end, from command start to files written: cold, traced, warm.

    python benchmarks/personalize.py --out benchmarks/results/personalize_mini.json

Each run is a new process (`hdb personalize --config configs/mini.py` on the shipped
photo, the README's command), timed from its start to its exit; the rows differ only in
what its cache folder holds:
  cold     an empty cache: trace, store and compile every program (a new machine)
  traced   XLA's compiled code kept, the stored programs removed: what a process gets
           from JAX's persistent compilation cache alone (tracing and model imports left)
  warm     both kept: programs deserialized and fetched, no model code imported
  torch    the PyTorch route (benchmarks/personalize_torch.py): diffusers + peft, the same
           base (exported once by `hdb export-base`), photo, LoRA init (the hypernetwork's
           prediction relaxed to rank 4, exported once with `hdb export --format peft`),
           steps, batch, learning rate and samples; prepared before the rounds, untimed
  import   `python -c "import hdb_jax.models"`: the model code's import alone
With `--before_repo` (a checkout of an earlier commit) and `--before_python` (its
virtualenv's python), the rows cold_before, warm_before and import_before run that code
in the same rounds, so that a change is measured against what it replaces on the same
machine under the same load.
Rounds are interleaved (cold, traced, warm, cold, ...) and the median of each row is
reported, with the stage times of its timings.json and the peak resident memory of the
process. Targets (issue "Personalize"): warm <= 10 s, cold <= 30 s on a 2-core CPU.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", "configs/mini.py", "Config with a `personalize` section.")
flags.DEFINE_string("image", "assets/mini_subject/photo_0.png", "The face photo.")
flags.DEFINE_integer("rounds", 3, "Runs of each row (interleaved); the median is reported.")
flags.DEFINE_list("rows", ["cold", "traced", "warm", "torch"], "Rows to measure.")
flags.DEFINE_list("set", [], "Config overrides passed as --set KEY=VALUE.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.DEFINE_string("before_repo", "", "A checkout of earlier code, for the *_before rows.")
flags.DEFINE_string("before_python", "", "The python that runs --before_repo's code.")
flags.DEFINE_string("prepare_torch", "", "Internal: write the PyTorch route's inputs to this "
                    "folder and print its command as JSON (run in a child process, so that "
                    "the parent stays small: a forked child's peak memory counts the parent's).")
FLAGS = flags.FLAGS


def _timed(command: list[str], cwd: str):
  """Run `command` -> (wall seconds, stderr, exit code, peak RSS in MB of the child)."""
  began = time.perf_counter()
  child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  stderr = child.stderr.read()
  _, status, usage = os.wait4(child.pid, 0)  # this child's own peak resident memory
  return (time.perf_counter() - began, stderr, os.waitstatus_to_exitcode(status),
          usage.ru_maxrss / 1024)


def run_import(before: bool = False) -> dict:
  """`import hdb_jax.models` in a new process -> wall seconds, peak RSS (MB)."""
  python, repo = (FLAGS.before_python, FLAGS.before_repo) if before else (sys.executable, REPO)
  wall, stderr, code, rss = _timed([python, "-c", "import hdb_jax.models"], repo)
  if code:
    raise RuntimeError(f"import failed:\n{stderr[-3000:]}")
  return {"wall": wall, "stages": {}, "final_loss": None, "programs_stored": None,
          "peak_rss_mb": rss}


def run_once(cache: str, out: str, before: bool = False) -> dict:
  """One `hdb personalize` process -> wall seconds, its timings.json, peak RSS (MB)."""
  python, repo = (FLAGS.before_python, FLAGS.before_repo) if before else (sys.executable, REPO)
  command = [python, "-m", "hdb_jax.cli", "personalize", "--config", FLAGS.config,
             "--image", FLAGS.image, "--out", out, "--cache-dir", cache, "--overwrite"]
  for pair in FLAGS.set:
    command += ["--set", pair]
  wall, stderr, code, rss = _timed(command, repo)
  if code:
    raise RuntimeError(f"hdb personalize failed:\n{stderr[-3000:]}")
  with open(os.path.join(out, "timings.json")) as f:
    timings = json.load(f)
  return {"wall": wall, "stages": timings["seconds"], "final_loss": timings["final_loss"],
          "programs_stored": timings["programs_stored"], "peak_rss_mb": rss}


def prepare_torch_route(work: str) -> list[str]:
  """The PyTorch route's inputs (untimed): the base as a diffusers folder and the LoRA
  init as a PEFT file -> the command of one run, less --out."""
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from hdb_jax import cli, config_file, files, finetune, hypernet, lidb, lora
  config = config_file.load(os.path.join(REPO, FLAGS.config), cli._parse_overrides(FLAGS.set))
  cfg = config.personalize
  folder, init, peft = (os.path.join(work, name) for name in (
      "pytorch", "init.safetensors", "init_peft.safetensors"))
  assert cli.main(["export-base", "--config", os.path.join(REPO, FLAGS.config),
                   "--out", folder]) == 0
  net, params, info = hypernet.load(cfg.hypernet)
  spec = info["lidb_spec"]
  net_params, _ = hypernet.split_aux(params, hypernet.weight_layout(spec))
  photo = files.read_image(os.path.join(REPO, FLAGS.image), int(info["image_size"]))
  iterations = int(cfg.iterations or info["hypernet"]["iterations"])
  predicted = net.apply({"params": net_params}, photo[None], iterations=iterations)
  relaxed = finetune.initial_lora(jax.tree_util.tree_map(lambda x: x[0], predicted),
                                  lidb.make_aux(spec), cfg.rank)
  lora.save(init, jax.tree_util.tree_map(np.asarray, relaxed))
  assert cli.main(["export", "--weights", init, "--format", "peft", "--out", peft]) == 0
  prompts = [p.format(token=config.token, class_name=config.class_name) for p in cfg.prompts]
  return [sys.executable, os.path.join(REPO, "benchmarks", "personalize_torch.py"),
          "--folder", folder, "--lora", peft, "--image", os.path.join(REPO, FLAGS.image),
          "--prompts", json.dumps(prompts),
          "--prompt", config.instance_prompt.format(token=config.token,
                                                    class_name=config.class_name),
          "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
          "--learning-rate", str(cfg.learning_rate), "--per-prompt", str(cfg.per_prompt),
          "--sample-steps", str(cfg.sample_steps), "--guidance-scale", str(cfg.guidance_scale)]


def run_torch_once(command: list[str], out: str) -> dict:
  """One PyTorch-route process -> wall seconds, its timings.json, peak RSS (MB)."""
  began = time.perf_counter()
  child = subprocess.Popen(command + ["--out", out], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  stderr = child.stderr.read()
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - began
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"the PyTorch route failed:\n{stderr[-3000:]}")
  with open(os.path.join(out, "timings.json")) as f:
    timings = json.load(f)
  return {"wall": wall, "stages": timings["seconds"], "final_loss": timings["final_loss"],
          "programs_stored": None,
          "peak_rss_mb": usage.ru_maxrss / 1024}


def prepare_in_child(work: str) -> list[str]:
  """`prepare_torch_route` in a child process -> the command it returns."""
  command = [sys.executable, os.path.abspath(__file__), "--prepare_torch", work,
             "--config", FLAGS.config, "--image", FLAGS.image]
  for pair in FLAGS.set:
    command += ["--set", pair]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"preparing the PyTorch route failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.prepare_torch:
    print(json.dumps(prepare_torch_route(FLAGS.prepare_torch)))
    return
  work = tempfile.mkdtemp(prefix="hdb-bench-personalize-")
  cache, out = os.path.join(work, "cache"), os.path.join(work, "out")
  results = {row: [] for row in FLAGS.rows}
  try:
    torch_command = prepare_in_child(work) if "torch" in FLAGS.rows else None
    for round_index in range(FLAGS.rounds):
      for row in FLAGS.rows:
        if row == "torch":
          results[row].append(run_torch_once(torch_command, os.path.join(work, "torch_out")))
          print(f"round {round_index + 1} torch   {results[row][-1]['wall']:6.1f} s  "
                f"{json.dumps(results[row][-1]['stages'])}", flush=True)
          continue
        before = row.endswith("_before")
        kind = row[:-len("_before")] if before else row
        if kind == "import":
          result = run_import(before)
          results[row].append(result)
          print(f"round {round_index + 1} {row:13s} {result['wall']:6.1f} s", flush=True)
          continue
        row_cache = cache + ("_before" if before else "")
        if kind == "cold":
          shutil.rmtree(row_cache, ignore_errors=True)
        elif kind == "traced":
          shutil.rmtree(os.path.join(row_cache, "programs"), ignore_errors=True)
        if kind != "cold" and not os.path.isdir(os.path.join(row_cache, "xla")):
          run_once(row_cache, out, before)  # fill the cache first
        result = run_once(row_cache, out, before)
        results[row].append(result)
        print(f"round {round_index + 1} {row:13s} {result['wall']:6.1f} s  "
              f"{json.dumps(result['stages'])}", flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  summary = {}
  for row, runs in results.items():
    stages = sorted({k for r in runs for k in r["stages"]})
    summary[row] = {
        "wall_seconds_median": round(statistics.median(r["wall"] for r in runs), 2),
        "wall_seconds": [round(r["wall"], 2) for r in runs],
        "stage_seconds_median": {k: round(statistics.median(r["stages"][k] for r in runs), 3)
                                 for k in stages},
        "programs_stored": [r["programs_stored"] for r in runs],
        "final_loss": [r["final_loss"] for r in runs],
        "peak_rss_mb_max": round(max(r["peak_rss_mb"] for r in runs), 1)}
  import jax
  report = {
      # the earlier checkout and its python are machine paths: named relative to REPO
      "command": "python benchmarks/personalize.py " + " ".join(
          os.path.relpath(arg, REPO) if os.path.isabs(arg) else arg for arg in sys.argv[1:]),
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "jax": jax.__version__},
      "config": FLAGS.config, "image": FLAGS.image, "rounds": FLAGS.rounds,
      "rows": summary,
      "targets_seconds": {"warm": 10.0, "cold": 30.0}}
  if "torch" in summary:
    for row in ("cold", "warm"):
      if row in summary:
        report[f"torch_over_{row}"] = round(summary["torch"]["wall_seconds_median"]
                                            / summary[row]["wall_seconds_median"], 2)
  for row in ("cold", "warm", "import"):
    if row in summary and row + "_before" in summary:
      report[f"{row}_before_over_{row}"] = round(
          summary[row + "_before"]["wall_seconds_median"] / summary[row]["wall_seconds_median"], 2)
  if "warm" in summary and "traced" in summary:
    report["warm_speedup_over_traced"] = round(
        summary["traced"]["wall_seconds_median"] / summary["warm"]["wall_seconds_median"], 2)
  print(json.dumps(report, indent=2))
  if FLAGS.out:
    sys.path.insert(0, REPO)
    from hdb_jax import files
    files.write_json(os.path.join(REPO, FLAGS.out) if not os.path.isabs(FLAGS.out)
                     else FLAGS.out, report)


if __name__ == "__main__":
  app.run(main)
