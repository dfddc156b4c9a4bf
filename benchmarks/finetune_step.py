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

METHODS = {  # method -> (PyTorch counterpart, LoRA rank on the PyTorch side)
    "lidb1": ("lidb1", 1), "lidb1-side": ("lidb1", 1),
    "lora4": ("lora4", 4), "lora4-side": ("lora4", 4),
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")         # peft names of lidb.DEFAULT_TARGETS
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a sks face"
POOL_SIZE = 2  # a photo and its mirror image, as `hdb personalize`

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

def _rss_peak_reset():
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)


def _rss_mb(field: str) -> float:
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
    info = _read_json(os.path.join(work, "export.json"))
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


class TorchWorker:
  """diffusers UNet + transformers CLIP text encoder with peft LoRA adapters of `rank`."""

  def __init__(self, name: str, method: str, work: str):
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel
    del name
    began = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    self.torch = torch
    rank = METHODS[method][1]
    folder = os.path.join(work, "pytorch")
    info = _read_json(os.path.join(work, "export.json"))
    self.batch_size = info["batch_size"]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    self.scheduler = DDPMScheduler.from_config(info["scheduler"])
    data = np.load(os.path.join(work, "batches.npz"))

    with torch.no_grad():  # the fixed check batch, before any adapter (B = 0 adds nothing)
      context = text_encoder(torch.from_numpy(data["check_ids"]).long())[0]
      noise = torch.from_numpy(data["check_noise"])
      timesteps = torch.from_numpy(data["check_timesteps"]).long()
      noisy = self.scheduler.add_noise(torch.from_numpy(data["check_latents"]), noise,
                                       timesteps)
      prediction = unet(noisy, timesteps, context).sample
      check_loss = float(torch.nn.functional.mse_loss(prediction, noise))

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS)))
    text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_TARGETS)))
    unet.train()
    text_encoder.train()
    self.unet, self.text_encoder = unet, text_encoder
    trainable = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(trainable, lr=FLAGS.learning_rate,
                                       weight_decay=FLAGS.weight_decay)
    self.pool_mean = torch.from_numpy(data["pool_mean"])
    self.pool_std = torch.from_numpy(data["pool_std"])
    self.input_ids = torch.from_numpy(data["input_ids"]).long().expand(POOL_SIZE, -1)
    self.generator = torch.Generator().manual_seed(1)
    adapted = sum(1 for m in (unet, text_encoder) for n, _ in m.named_modules()
                  if n.endswith(".lora_A"))
    self.result = {"check_loss": check_loss, "adapted_layers": adapted,
                   "trainable_values": sum(p.numel() for p in trainable)}

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      self.step_once()
    self.result["torch_flops"] = float(counter.get_total_flops())
    self.step_once()  # warm-up
    self.result["setup_seconds"] = time.perf_counter() - began

  def step_once(self):
    """One training step, as the ports' loops: draw, noise, forward, backward, AdamW."""
    torch = self.torch
    index = torch.randint(0, POOL_SIZE, (self.batch_size,), generator=self.generator)
    mean, std = self.pool_mean[index], self.pool_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=self.generator)
    noise = torch.randn(latents.shape, generator=self.generator)
    timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps,
                              (self.batch_size,), generator=self.generator)
    noisy = self.scheduler.add_noise(latents, noise, timesteps)
    context = self.text_encoder(self.input_ids[index])[0]
    prediction = self.unet(noisy, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def window(self, min_seconds: float, min_steps: int) -> dict:
    start, steps = time.perf_counter(), 0
    while True:
      loss = self.step_once()
      steps += 1
      if steps >= min_steps and time.perf_counter() - start >= min_seconds:
        break
    seconds = time.perf_counter() - start
    return {"ms_per_step": 1000 * seconds / steps, "steps": steps, "last_loss": float(loss)}


class PeakWorker:
  """GFLOP/s of a 2048 x 2048 fp32 matmul with NumPy, JAX and PyTorch (2 threads), and the
  memory bandwidth of a 256 MB copy (bytes read + written per second)."""
  SIZE = 2048
  COPY_BYTES = 256 * 2**20

  def __init__(self, name: str, method: str, work: str):
    del name, method, work
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((self.SIZE, self.SIZE)).astype(np.float32) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    self.calls = {"numpy": lambda: a @ b,
                  "jax": lambda: matmul(ja, jb).block_until_ready(),
                  "torch": lambda: torch.mm(ta, tb)}
    for call in self.calls.values():
      call()
    self.copy_source = np.ones(self.COPY_BYTES // 4, np.float32)
    self.copy_target = np.zeros_like(self.copy_source)
    self.result = {"size": self.SIZE}

  def window(self, min_seconds: float, min_steps: int) -> dict:
    """Best GFLOP/s of each library over a few calls (about min_seconds in all)."""
    del min_steps
    flop = 2 * self.SIZE**3
    out = {}
    for library, call in self.calls.items():
      best, start = float("inf"), time.perf_counter()
      while time.perf_counter() - start < min_seconds / len(self.calls) or best == float("inf"):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
      out[library] = flop / best / 1e9
    import numpy as np
    best = float("inf")
    for _ in range(5):
      began = time.perf_counter()
      np.copyto(self.copy_target, self.copy_source)
      best = min(best, time.perf_counter() - began)
    return {"gflops": out, "copy_gb_per_second": 2 * self.COPY_BYTES / best / 1e9}


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def run_child():
  """A worker: set up, print READY, then answer 'window' / 'quit' lines on stdin."""
  if FLAGS.child == "export":
    info = run_export(FLAGS.model, FLAGS.work)
    with open(os.path.join(FLAGS.work, "export.json"), "w") as f:
      json.dump(info, f)
    return
  if FLAGS.child == "peak":
    worker = PeakWorker("", "", "")
  else:
    side, method = FLAGS.child.split(":")
    worker = (JaxWorker if side == "jax" else TorchWorker)(FLAGS.model, method, FLAGS.work)
  worker.result["rss_after_setup_mb"] = _rss_mb("VmRSS")
  # The setup's peak (imports, weights, compilation, warm-up); then the windows' own.
  worker.result["setup_peak_rss_mb"] = _rss_mb("VmHWM")
  _rss_peak_reset()
  print("READY " + json.dumps(worker.result), flush=True)
  for line in sys.stdin:
    if line.strip() == "window":
      print("WINDOW " + json.dumps(worker.window(FLAGS.window_seconds, FLAGS.min_steps)),
            flush=True)
    else:
      break
  print("DONE " + json.dumps({"steps_peak_rss_mb": _rss_mb("VmHWM")}), flush=True)


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
  info = _read_json(os.path.join(work, "export.json"))
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
