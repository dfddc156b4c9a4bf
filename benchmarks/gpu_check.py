r"""Does hdb-jax run well on this accelerator? One run of a few minutes, nothing downloaded.

    pip install -e '.[cuda]' && bash benchmarks/gpu_check.sh       # a bare CUDA host
    bash benchmarks/gpu_check.sh --dry                              # CPU, tiny shapes

Prints, on the default device (issue "SD1.5 at scale", 7):
  1. the attention kernels (hdb_jax/nn/attention.py) that compile and run here, and what
     model.attention="auto" picks at SD1.5's shapes;
  2. their parity with XLA's attention at SD1.5's shapes (512 px: 4096 positions, 8
     heads of 40; the 77-token cross-attention): largest differences of values and
     gradients;
  3. the step time of SD1.5-shaped fast finetuning (configs/sd15.py's step: rank-4 LoRA,
     text encoder trained) in bf16 with random weights at 512 px, and its FLOPs;
  4. the device's peak memory so far;
  5. a personalization end to end with random weights (configs/hypernet_sd15_gpu.py's
     hypernetwork with a CLIP ViT-L/14-sized encoder, 40 finetuning steps, 4 samples of
     25 DDIM steps): first call (compiling) and second call.
--dry: the same code on configs/tiny.py's model (no remat) and a small hypernetwork,
2 steps, 1 sample of 2 steps, attention chunks of 64 (tests/test_gpu_check.py, CPU).
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hdb_jax import diffusion, dreambooth, finetune, hypernet, lidb, models  # noqa: E402
from hdb_jax.nn import attention  # noqa: E402


def section(title: str) -> None:
  print(f"\n== {title}", flush=True)


def attention_kernels(dry: bool) -> list[str]:
  """Which kernels run on a self-attention of SD1.5's first block (or a small one)."""
  section("1. attention kernels")
  print(f"platform {jax.default_backend()}, devices {jax.devices()}")
  length, dim = (256, 8) if dry else (4096, 40)
  q = jnp.ones((1, length, 8, dim), jnp.bfloat16)
  working = []
  for kernel in ("xla", "cudnn", "pallas", "chunked"):
    try:
      jax.block_until_ready(jax.jit(lambda q: attention.dot_product_attention(
          q, q, q, implementation=kernel))(q))
      working.append(kernel)
      print(f"  {kernel:8s} runs")
    except Exception as e:  # not on this platform: say why, in one line
      print(f"  {kernel:8s} not available ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
  for shape in ((length, length, dim), (length, 77, dim), (length // 16, length // 16, 160)):
    picked = attention.resolve("auto", jnp.ones((1, shape[0], 8, shape[2]), jnp.bfloat16),
                               jnp.ones((1, shape[1], 8, shape[2]), jnp.bfloat16), None)
    print(f"  auto, bf16, {shape[0]} queries x {shape[1]} keys, head dim {shape[2]}: {picked}")
  return working


def parity(working: list[str], dry: bool) -> None:
  section("2. parity with XLA attention (bf16 inputs, float32 softmax)")
  rng = np.random.default_rng(0)
  length, dim = (256, 8) if dry else (4096, 40)
  for keys in (length, 77):
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 8, dim)), jnp.bfloat16)
               for n in (length, keys, keys))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)

    def run(kernel):
      @jax.jit
      def values_and_grads(q, k, v, cotangent):
        fn = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=kernel)
        out, vjp = jax.vjp(fn, q, k, v)
        return [x.astype(jnp.float32) for x in (out, *vjp(cotangent))]
      return [np.asarray(x) for x in values_and_grads(q, k, v, cotangent)]
    reference = run("xla")
    for kernel in working:
      if kernel == "xla":
        continue
      try:
        got = run(kernel)
      except Exception as e:
        print(f"  {kernel:8s} {length}x{keys}: not for these shapes ({type(e).__name__})")
        continue
      diffs = [float(np.abs(a - b).max()) for a, b in zip(got, reference)]
      print(f"  {kernel:8s} {length}x{keys}: max |diff| values {diffs[0]:.2e}, "
            f"grads q/k/v {diffs[1]:.2e} / {diffs[2]:.2e} / {diffs[3]:.2e}")


def build(dry: bool):
  """(sd, random params, spec, aux, personalize cfg, hypernet, its params, photo size)."""
  from configs import hypernet_mini, hypernet_sd15_gpu, sd15, tiny
  config = tiny.get_config() if dry else sd15.get_config()
  model = config.model
  model.compute_dtype, model.attention = "bfloat16", "auto"
  model.remat = "none" if dry else "blocks"  # dry: half the compile time
  if not dry:
    model.tokenizer_path = os.path.join(REPO, "assets", "mini_tokenizer")  # ids only
  began = time.perf_counter()
  sd, _ = models.from_config(model)
  params = models.init_random(sd, 0)
  lidb_cfg = config.lidb
  spec = lidb.make_spec(params, seed=lidb_cfg.seed, a=lidb_cfg.a, b=lidb_cfg.b,
                        rank=lidb_cfg.rank, targets=dict(lidb_cfg.targets))
  if dry:
    net_cfg = hypernet_mini.get_config().hypernet
    encoder, size = None, sd.image_size
  else:
    net_cfg = hypernet_sd15_gpu.get_config().hypernet
    encoder = models.vision_encoder_from_config(hypernet_sd15_gpu.CLIP_VIT_L14, "bfloat16")
    size = hypernet_sd15_gpu.CLIP_VIT_L14["image_size"]
  net = hypernet.make(hypernet.weight_layout(spec), net_cfg, encoder)
  net_params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  print(f"random weights built in {time.perf_counter() - began:.1f} s "
        f"({sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.0f}M base params)")
  cfg = config.personalize if not dry else dict(rank=4, batch_size=1, learning_rate=1e-4)
  return sd, params, spec, lidb.make_aux(spec), cfg, net, net_params, size


def finetune_step(sd, params, spec, aux, cfg, dry: bool):
  """-> the jitted step (compiled for the batch of section 5)."""
  section("3. fast finetuning step (bf16 compute, random weights)")
  tx = finetune.optimizer(cfg["learning_rate"])
  trained, fixed = finetune.split(
      finetune.initial_lora(lidb.init(spec, jax.random.key(0)), aux, cfg["rank"]), True)
  opt_state = tx.init(trained)
  rng = np.random.default_rng(0)
  latent = rng.normal(size=(2, 4, sd.latent_size, sd.latent_size)).astype(np.float32)
  pool = dreambooth.make_pool({"mean": latent, "std": np.full_like(latent, 0.1)},
                              sd.tokenize(["a sks person"]), 1.0)
  step = finetune.make_step(sd, tx, cfg["batch_size"])  # reused by section 5
  lowered = step.lower(trained, opt_state, fixed, params, (pool,), jax.random.key(0))
  print(f"  {(lowered.cost_analysis() or {}).get('flops', 0) / 1e12:.4f} TFLOP per step "
        "(XLA's count of the lowered step)")
  times = []
  for i in range(3 if dry else 12):
    began = time.perf_counter()
    trained, opt_state, loss = step(trained, opt_state, fixed, params, (pool,),
                                    jax.random.key(i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - began)
  print(f"  first step (compiles) {times[0]:.1f} s")
  timed = times[2:]
  print(f"  batch {cfg['batch_size']} at {sd.image_size} px: median {statistics.median(timed) * 1e3:.1f} "
        f"ms per step over {len(timed)} steps (loss {float(loss):.4f})")
  return step


def peak_memory() -> None:
  section("4. device memory")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"  peak {stats['peak_bytes_in_use'] / 2**30:.2f} GB of "
          f"{stats.get('bytes_limit', 0) / 2**30:.1f} GB")
  else:
    print("  not reported by this platform (the CPU reports none)")


def personalization(sd, params, spec, aux, cfg, net, net_params, size, step, dry: bool):
  section("5. personalization end to end (random weights)")
  steps, samples, sample_steps = (2, 1, 2) if dry else (40, 4, 25)
  predict = jax.jit(lambda p, x: net.apply({"params": p}, x))
  encode = jax.jit(lambda p, x: sd.encode_images(p, x))
  sample = jax.jit(lambda p, c, u, k: diffusion.generate(sd, p, c, u, k, 4.0, sample_steps))
  photo = np.random.default_rng(1).uniform(-1, 1, (1, sd.image_size, sd.image_size, 3))
  cond, uncond = sd.tokenize(["a sks person"] * samples), sd.tokenize([""] * samples)

  def once():
    images = jax.image.resize(jnp.asarray(photo, jnp.float32), (1, size, size, 3), "linear")
    predicted = jax.tree_util.tree_map(lambda x: x[0], predict(net_params, images))
    mean, std = encode(params["vae"], jnp.concatenate([photo, photo[:, :, ::-1]]))
    pool = dreambooth.make_pool({"mean": mean, "std": std}, cond[:1], 1.0)
    lora_tree, _ = finetune.finetune(
        sd, params, finetune.initial_lora(predicted, aux, cfg["rank"]), [pool], steps=steps,
        learning_rate=cfg["learning_rate"], batch_size=cfg["batch_size"], seed=0,
        step_fn=step)
    from hdb_jax import lora
    images = sample(lora.merge(params, lora_tree), cond, uncond, jax.random.key(0))
    return jax.block_until_ready(images)
  for call in ("first (compiles)", "second"):
    began = time.perf_counter()
    images = once()
    print(f"  {call}: {time.perf_counter() - began:.1f} s for hypernetwork + {steps} steps + "
          f"{samples} samples x {sample_steps} DDIM steps ({images.shape[1]} px)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry", action="store_true", help="tiny shapes, on any platform")
  args = parser.parse_args()
  if args.dry:
    attention.CHUNK = 64  # the tiny shapes in chunks too
  working = attention_kernels(args.dry)
  parity(working, args.dry)
  built = build(args.dry)
  step = finetune_step(*built[:5], args.dry)
  peak_memory()
  personalization(*built, step, args.dry)
  print("\ngpu_check: done")


if __name__ == "__main__":
  main()
