r"""HyperNetwork forward pass: one photo -> LiDB weights, per image and per batch (JAX only).

    python benchmarks/hypernet_forward.py --out benchmarks/results/hypernet_forward.json

Issue "Performance", (b). Rows:
  mini   the committed network (assets/mini_hypernet: ViT 96 x 3 blocks on 32 px photos,
         decoder 96 x 2 blocks, 40 weight tokens of the mini base)
  sd15   configs/hypernet_sd15_gpu.py's architecture with random weights: a CLIP
         ViT-L/14 vision tower at 224 px (the config reads a pretrained one from a local
         folder; here only its config.json's sizes are used), decoder 512 x 4 blocks, the
         176 weight tokens of SD1.5's LiDB spec (from the model's shapes, nothing
         allocated for the base). float32: bfloat16, the GPU config's encoder dtype, is
         emulated and slower on this CPU.
For every row and batch size: compile seconds, then the median seconds per call of
`--calls` calls (after one warm-up call), images per second, and the same at s = 1 to
tell the encoder (once per image) from the decoder iterations. One process; the batch
sizes run in turn, so compare rows of one run.
"""

import os
import platform
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_list("models", ["mini", "sd15"], "Rows: mini (committed network), sd15.")
flags.DEFINE_list("mini_batches", ["1", "8", "32"], "Batch sizes of the mini row.")
flags.DEFINE_list("sd15_batches", ["1", "4"], "Batch sizes of the sd15 row.")
flags.DEFINE_list("iterations", ["4", "1"], "Refinement steps s to time (4: as trained).")
flags.DEFINE_integer("calls", 10, "Timed calls per measurement (median).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS



def mini_network():
  """(module, params, image size, values per image): the committed mini hypernetwork."""
  import ml_collections
  from hdb_jax import hypernet
  params, info = hypernet.read(os.path.join(REPO, "assets", "mini_hypernet"))
  spec = info["lidb_spec"]
  layout = hypernet.weight_layout(spec)
  net = hypernet.make(layout, ml_collections.ConfigDict(info["hypernet"]))
  return net, params, int(info["image_size"]), spec.num_trainable


def sd15_network():
  """The SD1.5 GPU config's hypernetwork with random weights (see the module docstring)."""
  import jax
  import numpy as np
  from configs import hypernet_sd15_gpu, sd15
  from hdb_jax import hypernet, lidb, models
  config = hypernet_sd15_gpu.get_config()
  _, abstract = models.from_config(sd15.sd15_model(), tokenizer=None)  # shapes only
  preopt = sd15.get_config().lidb
  spec = lidb.make_spec(abstract, seed=preopt.seed, a=preopt.a, b=preopt.b,
                        rank=preopt.rank, targets=dict(preopt.targets))
  encoder = models.vision_encoder_from_config(hypernet_sd15_gpu.CLIP_VIT_L14, "float32")
  net_config = config.hypernet
  net_config.dtype = "float32"
  net = hypernet.make(hypernet.weight_layout(spec), net_config, encoder)
  size = hypernet_sd15_gpu.CLIP_VIT_L14["image_size"]
  params = jax.jit(net.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  return net, params["params"], size, spec.num_trainable


def measure(net, params, size: int, batch: int, iterations: int) -> dict:
  import jax
  import numpy as np
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  fn = jax.jit(lambda p, x: net.apply({"params": p}, x, iterations=iterations))
  began = time.perf_counter()
  compiled = fn.lower(params, images).compile()
  compile_seconds = time.perf_counter() - began
  jax.block_until_ready(compiled(params, images))  # warm-up
  times = []
  for _ in range(FLAGS.calls):
    began = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - began)
  seconds = statistics.median(times)
  flops = (compiled.cost_analysis() or {}).get("flops")
  return {"batch": batch, "iterations": iterations, "compile_seconds": round(compile_seconds, 2),
          "seconds_per_call": round(seconds, 5), "seconds_per_image": round(seconds / batch, 5),
          "images_per_second": round(batch / seconds, 2),
          "gflop_per_image": round(flops / batch / 1e9, 3) if flops else None}


def main(argv):
  del argv
  import jax
  builders = {"mini": (mini_network, FLAGS.mini_batches),
              "sd15": (sd15_network, FLAGS.sd15_batches)}
  results = {"command": "python benchmarks/hypernet_forward.py " + " ".join(sys.argv[1:]),
             "machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                         "python": platform.python_version(), "jax": jax.__version__},
             "rows": {}}
  for name in FLAGS.models:
    if name not in builders:
      raise app.UsageError(f"unknown model {name!r} (mini, sd15)")
    build, batches = builders[name]
    net, params, size, values = build()
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    row = {"image_size": size, "network_params": int(count), "lidb_values": int(values),
           "measurements": []}
    for iterations in [int(s) for s in FLAGS.iterations]:
      for batch in [int(b) for b in batches]:
        m = measure(net, params, size, batch, iterations)
        print(f"{name:5s} s={iterations} batch {batch:3d}: {m['seconds_per_call'] * 1e3:9.1f} "
              f"ms/call {m['seconds_per_image'] * 1e3:8.2f} ms/image "
              f"{m['images_per_second']:8.1f} images/s (compile {m['compile_seconds']} s)",
              flush=True)
        row["measurements"].append(m)
    results["rows"][name] = row
  if FLAGS.out:
    from hdb_jax import files
    files.write_json(FLAGS.out, results)
    print("wrote", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
