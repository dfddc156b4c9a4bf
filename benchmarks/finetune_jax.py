"""benchmarks/finetune_step.py's models and JAX side: the model of each `--models` name,
its PyTorch folder and shared batches (the `export` child), and the JAX worker that times
one of hdb-jax's finetune steps (with XLA's cost analysis and a profiler breakdown of its
kernels). Also the names both sides share. Flags: finetune_step.py's."""

import json
import os
import statistics
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

METHODS = {  # method -> (PyTorch counterpart, LoRA rank on the PyTorch side)
    "lidb1": ("lidb1", 1), "lidb1-side": ("lidb1", 1),
    "lora4": ("lora4", 4), "lora4-side": ("lora4", 4),
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")         # peft names of lidb.DEFAULT_TARGETS
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a sks face"
POOL_SIZE = 2  # a photo and its mirror image, as `hdb personalize`


# ------------------------------------------------------------------------------------
# Models

def model_config(name: str):
  """The model's ConfigDict (architecture; `path` set for the committed mini base)."""
  if name == "mini":
    from configs.mini import mini_model
    return mini_model()
  if name == "tiny":
    from configs.tiny import tiny_model
    return tiny_model()
  if name == "sd15":
    from configs.sd15 import sd15_model
    config = sd15_model()
    config.unet.sample_size = FLAGS.sd15_latent_size
    config.vae.sample_size = FLAGS.sd15_latent_size * 8
    # Any CLIP tokenizer gives ids for the timing; the prompt is padded to 77 tokens.
    config.tokenizer_path = os.path.join(REPO, "assets", "mini_tokenizer")
    return config
  raise app.UsageError(f"unknown model {name!r} (mini, tiny, sd15)")


def default_batch_size(name: str) -> int:
  return FLAGS.batch_size or (1 if name == "sd15" else 4)


def build_jax_model(name: str):
  """(sd, params): the committed mini base, or random weights (`models.init_random`,
  seeded per layer path: the export child and the JAX workers draw the same values)."""
  from hdb_jax import models
  return models.load_or_build(model_config(name))


def prompt_ids(sd) -> "np.ndarray":
  """The prompt's token ids [1, L], L = the text encoder's positions (77 for SD1.5)."""
  length = sd.text_encoder.config.max_position_embeddings
  return sd.tokenizer([PROMPT], max_length=length)["input_ids"].astype("int32")


# ------------------------------------------------------------------------------------
# The PyTorch folder and the shared batches

def export_torch(sd, params, folder: str) -> None:
  """Write `params`' UNet and text encoder as a diffusers / transformers PyTorch folder,
  with the key map and configs `hdb export-base` uses (hdb_jax/nn/export.py; no torch)."""
  from hdb_jax import models
  from hdb_jax.nn import export
  configs = models.config_dicts(sd)
  for name in ("unet", "text_encoder"):
    export.write_torch_component(os.path.join(folder, name), name, params.pop(name),
                                 configs[name])


def run_export(name: str, work: str) -> dict:
  """Child `export`: the PyTorch folder, the pool and the fixed check batch of a model."""
  import numpy as np
  sd, params = build_jax_model(name)
  batch_size = default_batch_size(name)
  ids = prompt_ids(sd)
  latent_shape = (sd.latent_channels, sd.latent_size, sd.latent_size)
  rng = np.random.default_rng(0)
  np.savez(os.path.join(work, "batches.npz"),
           pool_mean=rng.standard_normal((POOL_SIZE,) + latent_shape).astype(np.float32),
           pool_std=np.full((POOL_SIZE,) + latent_shape, 0.05, np.float32),
           input_ids=ids,
           check_latents=rng.standard_normal((batch_size,) + latent_shape).astype(np.float32),
           check_noise=rng.standard_normal((batch_size,) + latent_shape).astype(np.float32),
           check_timesteps=np.linspace(10, 990, batch_size).astype(np.int32),
           check_ids=np.repeat(ids, batch_size, 0))
  schedule = {k: getattr(sd.scheduler, k) for k in (
      "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")}
  from hdb_jax import params as params_lib
  info = {"batch_size": batch_size, "latent_shape": list(latent_shape),
          "text_length": int(ids.shape[1]), "scheduler": schedule,
          "unet_params": params_lib.count(params["unet"]),
          "text_encoder_params": params_lib.count(params["text_encoder"])}
  export_torch(sd, params, os.path.join(work, "pytorch"))
  return info


# ------------------------------------------------------------------------------------
# Workers: set up once, then time windows on request

def rss_peak_reset():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)


def rss_mb(field: str) -> float:
  """VmHWM (peak) or VmRSS (now) of this process, MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


class JaxWorker:
  """One of hdb-jax's steps on the shared pool; `window()` times it."""

  def __init__(self, name: str, method: str, work: str):
    import jax
    import numpy as np
    from hdb_jax import diffusion, dreambooth, finetune, lidb, params as params_lib
    began = time.perf_counter()
    self.jax = jax
    sd, frozen = build_jax_model(name)
    data = np.load(os.path.join(work, "batches.npz"))
    info = read_json(os.path.join(work, "export.json"))
    batch_size = info["batch_size"]
    spec = lidb.make_spec(frozen, seed=0, a=100, b=50, rank=1)
    aux = lidb.make_aux(spec)
    pools = (dreambooth.make_pool({"mean": jax.numpy.asarray(data["pool_mean"]),
                                   "std": jax.numpy.asarray(data["pool_std"])},
                                  data["input_ids"], 1.0),)
    tx = finetune.optimizer(FLAGS.learning_rate, FLAGS.weight_decay)
    lidb_train = lidb.init(spec, jax.random.key(0))  # U_train = 0: dW = 0, as PEFT's B = 0
    if method.startswith("lidb1"):
      trained = lidb_train
      step = (dreambooth.make_train_step(sd, tx, batch_size) if method == "lidb1"
              else _side_lidb_step(sd, tx, batch_size))
      fixed_args = (frozen, aux, pools)
    else:
      lora_tree = jax.jit(finetune.initial_lora, static_argnums=2)(lidb_train, aux, 4)
      trained, fixed = finetune.split(lora_tree, train_text_encoder=True)
      step = (finetune.make_step(sd, tx, batch_size) if method == "lora4"
              else _side_lora_step(sd, tx, batch_size))
      fixed_args = (fixed, frozen, pools)
    self.result = {"trainable_values": params_lib.count(trained),
                   "adapted_layers": spec.num_layers}

    # The fixed check batch: the base model's loss (every residual is zero at init).
    def check_loss(frozen, ids, latents, noise, timesteps):
      context = sd.encode_text(frozen["text_encoder"], ids)
      return diffusion.loss_given_noise(sd, frozen["unet"], context, latents, noise,
                                        timesteps).mean()
    self.result["check_loss"] = float(jax.jit(check_loss)(
        frozen, data["check_ids"], data["check_latents"], data["check_noise"],
        data["check_timesteps"]))

    opt_state = tx.init(trained)
    start = time.perf_counter()
    compiled = step.lower(trained, opt_state, *fixed_args, jax.random.key(0)).compile()
    self.result["compile_seconds"] = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.result["xla_flops"] = float(cost["flops"])
    self.result["xla_bytes_accessed"] = float(cost["bytes accessed"])
    memory = compiled.memory_analysis()
    if memory is not None:
      self.result["xla_peak_mb"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                    + memory.temp_size_in_bytes
                                    - memory.alias_size_in_bytes) / 2**20
      self.result["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
    self.step, self.fixed_args = step, fixed_args
    self.carry = [trained, opt_state]
    self.key = jax.random.key(1)
    self.steps_done = 0
    for _ in range(2):
      jax.block_until_ready(self.step_once())  # warm-up (the jit cache holds the compilation)
    if FLAGS.profile_steps:
      self.result["kernel_profile"] = kernel_profile(self.step_once, FLAGS.profile_steps,
                                                     os.path.join(work, "trace_" + method))
    self.result["setup_seconds"] = time.perf_counter() - began

  def step_once(self):
    """One training step, dispatched (not waited for) -> its loss."""
    self.carry[0], self.carry[1], loss = self.step(
        self.carry[0], self.carry[1], *self.fixed_args,
        self.jax.random.fold_in(self.key, self.steps_done))
    self.steps_done += 1
    return loss

  def window(self, min_seconds: float, min_steps: int) -> dict:
    """Steps for at least min_seconds and min_steps, one step in flight (dispatched while
    the previous one runs, as in finetune.train) -> ms per step."""
    start, steps, previous = time.perf_counter(), 0, None
    while True:
      loss = self.step_once()
      if previous is not None:
        previous.block_until_ready()
      previous, steps = loss, steps + 1
      if steps >= min_steps and time.perf_counter() - start >= min_seconds:
        break
    last = float(previous)
    seconds = time.perf_counter() - start
    return {"ms_per_step": 1000 * seconds / steps, "steps": steps, "last_loss": last}


HLO_NAME = r"^[a-z][a-z0-9_\-]*(\.\d+)?$"  # XLA:CPU kernels are traced under their HLO names
CONTROL_FLOW = r"^(while|call|conditional)(\.\d+)?$"  # spans of the kernels inside them


def kernel_profile(step_once, steps: int, folder: str) -> dict:
  """Where a JAX step's time goes: a profiler trace of `steps` steps, each waited for ->
  {"wall_ms_per_step", "kernels_per_step", "dispatch_ms_per_step", "categories": {category:
  {"ms_per_step", "kernels_per_step", "median_us"}}}.

  XLA:CPU traces every kernel (thunk) it runs under the HLO instruction's name; they are
  sorted by name: matmuls and convolutions ("ynn_fusion" = XLA's YNNPACK fusions of dots
  and convolutions, "dot", "convolution"), transposes and copies, and the rest
  (elementwise and reduction fusions). The key derivation (fold_in) per step is included.
  "dispatch": the host's time in the jitted call (argument flattening, buffer handling).
  Profiling slows the step a little; the timed windows run without it.
  """
  import glob
  import gzip
  import re
  import jax
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    began = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step_once())
    wall = (time.perf_counter() - began) / steps
  paths = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    return {}
  with gzip.open(max(paths, key=os.path.getmtime)) as f:  # this trace, not an older one
    trace = json.load(f)
  events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X"]
  hlo_name, control_flow = re.compile(HLO_NAME), re.compile(CONTROL_FLOW)
  durations = {}
  for event in events:
    name = event["name"]
    if not hlo_name.match(name) or control_flow.match(name):
      continue
    if name.startswith(("ynn_fusion", "dot", "convolution", "custom-call")):
      category = "matmul_conv"
    elif "transpose" in name or name.startswith("copy"):
      category = "transpose_copy"
    else:
      category = "other_fusions"
    durations.setdefault(category, []).append(float(event.get("dur", 0)))
  dispatch = [float(e["dur"]) for e in events if e["name"] == "PjitFunction(step)"]
  return {
      "steps": steps, "wall_ms_per_step": 1000 * wall,
      "kernels_per_step": sum(len(d) for d in durations.values()) / steps,
      "kernel_ms_per_step": sum(sum(d) for d in durations.values()) / 1000 / steps,
      # nested duplicates of one call have equal durations: count each call once
      "dispatch_ms_per_step": (statistics.median(dispatch) / 1000) if dispatch else None,
      "categories": {category: {"ms_per_step": sum(d) / 1000 / steps,
                                "kernels_per_step": len(d) / steps,
                                "median_us": statistics.median(d)}
                     for category, d in sorted(durations.items())}}


def _side_lidb_step(sd, tx, batch_size: int):
  """dreambooth.make_train_step's step with the LiDB residuals on the side path."""
  import jax
  import optax
  from hdb_jax import dreambooth, lidb, preopt

  def step(train, opt_state, frozen, aux, pools, rng):
    def loss_fn(train):
      with preopt.low_rank_side_path(lidb.factors(train, aux)):
        return dreambooth.pools_loss(sd, frozen, pools, rng, batch_size)
    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _side_lora_step(sd, tx, batch_size: int):
  """finetune.make_step's step with the LoRA on the side path instead of merged."""
  import jax
  import optax
  from hdb_jax import dreambooth, preopt

  def step(trained, opt_state, fixed, frozen, pools, rng):
    def loss_fn(trained):
      with preopt.low_rank_side_path({**trained, **fixed}):
        return dreambooth.pools_loss(sd, frozen, pools, rng, batch_size)
    loss, grads = jax.value_and_grad(loss_fn)(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
