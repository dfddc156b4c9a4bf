r"""Do SD1.5's training steps fit an accelerator? Compile them at their real shapes on fake
devices and read XLA's per-device memory analysis and FLOPs (nothing is allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/simulate_sd15.py --out benchmarks/results/simulate_sd15.json

Issue "Performance", 4. The steps of the accelerator configs, at 512 px (64x64x4
latents, 77 tokens), lowered with `jax.ShapeDtypeStruct` inputs on a `data` mesh over the
process's host devices (8 with the flag above: the GPU configs' one host of 8 GPUs; a
TPU slice's per-chip program is the same SPMD program with the same per-device shapes)
and compiled by XLA:CPU:
  preopt     configs/preopt_sd15_gpu.py's block step (hdb_jax/preopt.py): G identities per
             device (`--blocks`), bf16 compute, float32 weights and Adam state
  hypernet   configs/hypernet_sd15_gpu.py's step (hdb_jax/hypernet_train.py): 8 photos per
             device, CLIP ViT-L/14 encoder (sizes only) frozen, decoder 512 x 4
  personalize  configs/sd15.py's fast-finetuning step (hdb_jax/finetune.py): rank-4 LoRA,
             batch 1 + its mirror pool, one device, fp32 (the config's) and bf16 compute
under the model switches of issue "SD1.5 at scale": `--attention` (model.attention; XLA:CPU
compiles "xla" and "chunked", which stands in for the GPU/TPU flash kernels),
`--model_remats` (model.remat: per-block remat), `--param_dtypes` (model.param_dtype),
and the older whole-loss remat `--remats` (hdb_jax/preopt.py REMAT). A per-device
program does not depend on the device count (data parallel, base replicated): one
device with --hypernet_batch / --blocks per device compiles the same program faster.
XLA's cost analysis counts a while loop's body once: "chunked" rows undercount the
attention FLOPs (docs/benchmarks.md).
Per row: XLA's memory analysis of the compiled per-device program (arguments, outputs,
temporaries, aliased donations; peak = arguments + outputs + temporaries - aliased) and
its FLOPs, against 80 GB (H100/A100-80GB), 32 GB (TPU v4) and 16 GB (TPU v5e).
XLA:CPU's buffer assignment and fusion are not a GPU's or TPU's: read the numbers as
estimates of the right size, not exact peaks (docs/benchmarks.md).
"""

import os
import platform
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_list("steps", ["preopt", "hypernet", "personalize"], "Steps to compile.")
flags.DEFINE_list("blocks", ["1", "2", "4", "8"], "Pre-optimization identities per device.")
flags.DEFINE_list("remats", ["none"], "Whole-loss rematerialization (hdb_jax/preopt.py REMAT).")
flags.DEFINE_list("model_remats", ["none", "blocks"],
                  "Per-block rematerialization, model.remat (hdb_jax/nn/blocks.py REMAT).")
flags.DEFINE_list("param_dtypes", ["float32"], "Storage dtypes of the frozen base.")
flags.DEFINE_string("attention", "xla", "model.attention (XLA:CPU compiles 'xla' only).")
flags.DEFINE_integer("hypernet_batch", 8, "Hypernetwork training photos per device.")
flags.DEFINE_integer("latent_size", 64, "Latent side (64: 512 px).")
flags.DEFINE_list("personalize_dtypes", ["float32", "bfloat16"],
                  "Compute dtypes of the fast-finetuning step (configs/sd15.py: float32).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS

DEVICE_GB = {"H100 / A100 80GB": 80, "TPU v4": 32, "TPU v5e": 16}


def sd15(dtype: str, setting: dict):
  """(sd, abstract params) of SD1.5 at --latent_size, nothing allocated; `setting`:
  {"model_remat", "param_dtype"} (model.remat, model.param_dtype)."""
  from configs import sd15 as sd15_config
  from hdb_jax import models
  model = sd15_config.sd15_model()
  model.compute_dtype = dtype
  model.attention = FLAGS.attention
  model.remat = setting["model_remat"]
  model.param_dtype = setting["param_dtype"]
  model.unet.sample_size = FLAGS.latent_size
  model.vae.sample_size = FLAGS.latent_size * 8
  model.tokenizer_path = os.path.join(REPO, "assets", "mini_tokenizer")  # ids only
  return models.from_config(model)


def spec_of(abstract, lidb_cfg):
  from hdb_jax import lidb
  return lidb.make_spec(abstract, seed=lidb_cfg.seed, a=lidb_cfg.a, b=lidb_cfg.b,
                        rank=lidb_cfg.rank, targets=dict(lidb_cfg.targets))


def abstract(x):
  import jax
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def preopt_step(block: int, remat: str, setting: dict):
  """The pre-optimization block step's lowering (G = block x devices identities)."""
  import jax
  import numpy as np
  import optax
  from configs import preopt_sd15_gpu
  from hdb_jax import lidb, preopt
  config = preopt_sd15_gpu.get_config()
  sd, frozen = sd15(config.model.compute_dtype, setting)
  spec = spec_of(frozen, config.lidb)
  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  run = config.preopt
  fns = preopt.make_block_fns(sd, spec, optax.adam(run.learning_rate), mesh, seed=0,
                              batch_size=run.batch_size, eval_batch_size=run.eval_batch_size,
                              hflip=run.hflip, face_background_weight=None,
                              shared_init=run.shared_init, remat=remat)
  count = block * devices
  ids = jax.ShapeDtypeStruct((count,), np.int32)
  train, opt_state = jax.eval_shape(fns.init, ids)
  views = config.data.num_images * (2 if run.hflip else 1)
  latent = (count, views, 4, FLAGS.latent_size, FLAGS.latent_size)
  pool = {"mean": jax.ShapeDtypeStruct(latent, np.float32),
          "std": jax.ShapeDtypeStruct(latent, np.float32),
          "input_ids": jax.ShapeDtypeStruct((count, views, 77), np.int32)}
  aux = jax.tree_util.tree_map(abstract, lidb.make_aux(spec))  # not traceable: built
  return fns.train.lower(train, opt_state, frozen, aux, pool, ids,
                         jax.ShapeDtypeStruct((), np.int32))


def hypernet_step(remat: str, setting: dict):
  """The hypernetwork training step's lowering (the config's global batch)."""
  import jax
  import numpy as np
  from configs import hypernet_sd15_gpu, sd15 as sd15_config
  from hdb_jax import hypernet, hypernet_train, lidb, models
  config = hypernet_sd15_gpu.get_config()
  sd, frozen = sd15(config.model.compute_dtype, setting)
  spec = spec_of(frozen, sd15_config.get_config().lidb)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  encoder = models.vision_encoder_from_config(hypernet_sd15_gpu.CLIP_VIT_L14,
                                              config.hypernet.encoder.dtype)
  net = hypernet.make(hypernet.weight_layout(spec), config.hypernet, encoder)
  size = FLAGS.latent_size * 8
  batch = FLAGS.hypernet_batch * jax.device_count()
  params = jax.eval_shape(lambda: net.init(jax.random.key(0),
                                           np.zeros((1, size, size, 3), np.float32)))["params"]
  tx = hypernet_train.optimizer(config.train)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  fns = hypernet_train.make_step(
      net, sd, tx, mesh, hypernet_train.frozen_shardings(frozen, mesh), seed=0,
      loss_kwargs=dict(iterations=config.hypernet.iterations, alpha=config.train.alpha,
                       beta=config.train.beta, weight_loss=config.train.weight_loss,
                       hflip=config.train.hflip, jitter=config.train.jitter, remat=remat,
                       frozen_encoder=config.train.encoder_lr_scale == 0.0))
  target = jax.eval_shape(lambda: jax.vmap(lambda k: lidb.init(spec, k))(
      jax.random.split(jax.random.key(0), batch)))
  data = {"images": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32),
          "input_ids": jax.ShapeDtypeStruct((batch, 77), np.int32), "target": target}
  aux = jax.tree_util.tree_map(abstract, lidb.make_aux(spec))  # not traceable: built
  return fns.train.lower(state, frozen, aux, data, jax.ShapeDtypeStruct((), np.int32))


def personalize_step(remat: str, dtype: str, setting: dict):
  """The fast-finetuning step's lowering on one device (rank-4 LoRA, text encoder in)."""
  import jax
  import numpy as np
  from configs import sd15 as sd15_config
  from hdb_jax import dreambooth, finetune, lidb
  if remat != "none":
    return None  # the finetuning step has no remat option (it fits without)
  config = sd15_config.get_config()
  cfg = config.personalize
  sd, frozen = sd15(dtype, setting)
  spec = spec_of(frozen, config.lidb)
  tx = finetune.optimizer(cfg.learning_rate)

  aux = lidb.make_aux(spec)

  def init():
    train = lidb.init(spec, jax.random.key(0))
    return finetune.split(finetune.initial_lora(train, aux, cfg.rank),
                          cfg.train_text_encoder)
  trained, fixed = jax.eval_shape(init)
  opt_state = jax.eval_shape(tx.init, trained)
  views = 2 if cfg.hflip else 1
  latent = (views, 4, FLAGS.latent_size, FLAGS.latent_size)
  pool = jax.eval_shape(lambda: dreambooth.make_pool(
      {"mean": np.zeros(latent, np.float32), "std": np.zeros(latent, np.float32)},
      np.zeros((1, 77), np.int32), 1.0))
  step = finetune.make_step(sd, tx, cfg.batch_size)
  return step.lower(trained, opt_state, fixed, frozen, (pool,), jax.random.key(0))


def analyse(lowered) -> dict:
  began = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - began
  memory = compiled.memory_analysis()
  gb = lambda b: round(b / 2**30, 2)
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  return {"compile_seconds": round(seconds, 1),
          "arguments_gb": gb(memory.argument_size_in_bytes),
          "outputs_gb": gb(memory.output_size_in_bytes),
          "temporaries_gb": gb(memory.temp_size_in_bytes),
          "aliased_gb": gb(memory.alias_size_in_bytes), "peak_gb": gb(peak),
          "tflop_per_device": round(cost.get("flops", 0.0) / 1e12, 3),
          "fits": {name: peak < limit * 2**30 * 0.9 for name, limit in DEVICE_GB.items()}}


def main(argv):
  del argv
  import jax
  rows = []
  plans = []
  settings = [{"remat": remat, "model_remat": model_remat, "param_dtype": param_dtype}
              for remat in FLAGS.remats for model_remat in FLAGS.model_remats
              for param_dtype in FLAGS.param_dtypes]
  for setting in settings:
    remat = setting["remat"]
    if "preopt" in FLAGS.steps:
      plans += [(f"preopt block {b}/device", setting,
                 lambda b=int(b), r=remat, s=setting: preopt_step(b, r, s))
                for b in FLAGS.blocks]
    if "hypernet" in FLAGS.steps:
      plans.append((f"hypernet batch {FLAGS.hypernet_batch}/device", setting,
                    lambda r=remat, s=setting: hypernet_step(r, s)))
    if "personalize" in FLAGS.steps:
      plans += [(f"personalize {d} (1 device)", setting,
                 lambda r=remat, d=d, s=setting: personalize_step(r, d, s))
                for d in FLAGS.personalize_dtypes]
  for name, setting, lower in plans:
    lowered = lower()
    if lowered is None:
      continue
    row = {"step": name, **setting, "attention": FLAGS.attention, **analyse(lowered)}
    rows.append(row)
    print(f"{name:24s} {setting} peak {row['peak_gb']:7.2f} GB/device "
          f"(args {row['arguments_gb']}, temps {row['temporaries_gb']}) "
          f"{row['tflop_per_device']:8.3f} TFLOP/device; compiled in "
          f"{row['compile_seconds']} s", flush=True)
  results = {"command": "python benchmarks/simulate_sd15.py " + " ".join(sys.argv[1:]),
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                         "jax": jax.__version__, "devices": jax.device_count()},
             "latent_size": FLAGS.latent_size, "device_memory_gb": DEVICE_GB,
             "rows": rows}
  if FLAGS.out:
    from hdb_jax import files
    files.write_json(FLAGS.out, results)
    print("wrote", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
