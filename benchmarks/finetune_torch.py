"""benchmarks/finetune_step.py's PyTorch side: the worker that times the PyTorch route's
finetune step (diffusers UNet + transformers CLIP text encoder with peft LoRA adapters),
and the worker that measures the CPU's matmul peak and copy bandwidth. Flags:
finetune_step.py's."""

import os
import time

from absl import flags

from finetune_jax import METHODS, POOL_SIZE, TEXT_TARGETS, UNET_TARGETS, read_json

FLAGS = flags.FLAGS


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
    info = read_json(os.path.join(work, "export.json"))
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
