r"""Batched personalization: many photos trained together against one at a time.

    python benchmarks/personalize_batch.py --out benchmarks/results/personalize_batch.json

Issue "Performance", (f). `--photos` mini-world faces (renders of random identities), the full pipeline per photo: hypernetwork, relaxation, `personalize.steps` (40)
finetuning steps, and samples of the default prompts (6 x `per_prompt`). Rows:
  one at a time   hdb_jax/personalize.py (what `hdb personalize PHOTO` runs), photo after
                  photo in one process
  block G         hdb_jax/personalize_block.py (`hdb personalize FOLDER --block G`): G
                  identities per jit call, the model run once on their G x batch rows
Compilation is excluded (each row runs one untimed block first); photos per second over
the rest, the median of `--rounds` interleaved rounds, and the ratio to one at a time.
"""

import os
import platform
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_integer("photos", 16, "Photos (held-out identities) per round.")
flags.DEFINE_list("blocks", ["4", "8", "16"], "Block sizes to time.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (median).")
flags.DEFINE_string("config", os.path.join(REPO, "configs", "mini.py"), "Config file.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def face_photos(count: int):
  """[count, S, S, 3] in [-1, 1]: renders of random mini-world identities (the timing does
  not depend on who they are)."""
  import numpy as np
  from hdb_jax.mini import recognizer
  faces = recognizer.random_faces(np.random.default_rng(0), count)["images"]
  return np.asarray(recognizer.to_float(faces))


def main(argv):
  del argv
  import jax
  import numpy as np
  from hdb_jax import config_file, personalize, personalize_block
  config = config_file.load(FLAGS.config)
  words = dict(token=config.token, class_name=config.class_name)
  prompts = [prompt.format(**words) for prompt in config.personalize.prompts]
  photos = face_photos(FLAGS.photos)

  single = personalize.load(config, prompts, cache=None)
  single.ready()

  def one_at_a_time(batch):
    for photo in batch:
      result = personalize.run(single, photo)
      personalize.sample(single, result.lora, prompts, config.personalize.seed)

  runners = {"one at a time": one_at_a_time}
  for size in [int(b) for b in FLAGS.blocks]:
    block = personalize_block.load(config, prompts, size)

    def run_blocks(batch, block=block, size=size):
      for first in range(0, len(batch), size):
        out = personalize_block.run(block, batch[first:first + size])
        personalize_block.sample(block, out["lora"], prompts, config.personalize.seed)
    runners[f"block {size}"] = run_blocks

  for name, runner in runners.items():  # compile and warm up, untimed
    runner(photos[:int(name.split()[-1]) if name.startswith("block") else 1])
    print("warmed up:", name, flush=True)

  seconds = {name: [] for name in runners}
  for round_index in range(FLAGS.rounds):
    order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
    for name in order:
      began = time.perf_counter()
      runners[name](photos)
      seconds[name].append(time.perf_counter() - began)
      print(f"round {round_index}: {name:14s} {seconds[name][-1]:7.2f} s", flush=True)

  base = statistics.median(seconds["one at a time"])
  rows = {}
  for name, values in seconds.items():
    median = statistics.median(values)
    rows[name] = {"seconds": [round(v, 2) for v in values], "seconds_median": round(median, 2),
                  "photos_per_second": round(FLAGS.photos / median, 3),
                  "speedup_vs_one_at_a_time": round(base / median, 2)}
    print(f"{name:14s} {FLAGS.photos / median:6.2f} photos/s  x{base / median:5.2f}")
  results = {"command": "python benchmarks/personalize_batch.py " + " ".join(sys.argv[1:]),
             "machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                         "python": platform.python_version(), "jax": jax.__version__,
                         "devices": jax.device_count()},
             "photos": FLAGS.photos, "steps": config.personalize.steps,
             "samples_per_photo": len(prompts) * config.personalize.per_prompt,
             "rounds": FLAGS.rounds, "rows": rows}
  if FLAGS.out:
    from hdb_jax import files
    files.write_json(FLAGS.out, results)
    print("wrote", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
