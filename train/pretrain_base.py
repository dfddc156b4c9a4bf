r"""Pretrain the mini world's base model (VAE, UNet, CLIP text encoder) from scratch.

    python -m train.pretrain_base --config configs/mini.py --workdir workdir/mini_base

Reads the `train` split of `synthetic_faces/<config.data.config>` (built on first use),
then:
  1. VAE: reconstruction + small KL; its latent scaling factor is set to 1/std.
  2. UNet + text encoder: diffusion loss on the encoded dataset, each image with
     `config.pretrain.diffusion.caption_variants` captions of varied grammar, some with
     a rare word (hdb_jax/mini/captions.py), caption dropout for classifier-free
     guidance, EMA weights.
Writes to --workdir:
  base/            the pretrained model (diffusers layout, Flax weights): copy it to
                   assets/mini_base to make it the default of configs/mini.py; its
                   provenance.json: resolved config, command, a fingerprint of the
                   images and captions, steps, code commit
  vae_recon.png    held-in images (top) and their reconstructions (bottom)
  samples/         sample grids during training (rows = config.pretrain.sample_prompts)
  samples.png      the final grid; log.jsonl: losses
  checkpoints_vae/, checkpoints_diffusion/: orbax; rerunning the same command resumes.
"""

import json
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import checkpoint, dreambooth, files, logs, models, provenance
from hdb_jax.mini import captions as captions_lib
from hdb_jax.mini import dataset, pretrain

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/mini.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.mark_flags_as_required(["config", "workdir"])

PURPOSE_VAE, PURPOSE_DIFFUSION, PURPOSE_SAMPLE = 0, 1, 2


def load_dataset(config):
  """All train images [N, 32, 32, 3] in [-1, 1] and their captions, in memory.

  ~60 MB for the default config: a NumPy array on the device beats an input pipeline
  here, and batches are drawn inside the jitted step (deterministic, resumable).
  """
  records = dataset.source(config.data.config, "train", config.data.data_dir or None)
  rows = records.__getitems__(range(len(records)))
  images = np.stack([r["image"] for r in rows]).astype(np.float32) / 127.5 - 1.0
  return images, [r["caption"] for r in rows]


def tokenize_variants(config, sd, captions) -> np.ndarray:
  """Token ids [N, V, L] of V caption variants per image (V = 0: the dataset's own)."""
  num_variants = config.pretrain.diffusion.caption_variants
  if not num_variants:
    return sd.tokenize(captions)[:, None, :]
  variants = captions_lib.caption_variants(captions, num_variants, config.pretrain.seed)
  distinct = sorted({text for row in variants for text in row})
  ids = dict(zip(distinct, sd.tokenize(distinct)))
  longest = max(len(sd.tokenizer.encode(text)) for text in distinct)  # with BOS, EOS
  if longest > sd.max_length:
    raise ValueError(f"caption variants of {longest} tokens exceed the text encoder's "
                     f"{sd.max_length} positions")
  logging.info("caption variants: %d per image, %d distinct", num_variants, len(distinct))
  return np.stack([np.stack([ids[text] for text in row]) for row in variants])


def log_line(workdir, **values):
  with open(os.path.join(workdir, "log.jsonl"), "a") as f:
    f.write(json.dumps(dict(values, time=round(time.time(), 1))) + "\n")


def train_vae(config, sd, vae_params, images, workdir):
  cfg = config.pretrain.vae
  optimizer = pretrain.optimizer(cfg.learning_rate, cfg.steps, cfg.warmup)
  state = {"params": vae_params, "opt_state": optimizer.init(vae_params)}
  ckpt = checkpoint.manager(workdir, subdir="checkpoints_vae")
  start, state = checkpoint.restore_latest(ckpt, state)
  step_fn = pretrain.make_vae_step(sd, optimizer, cfg.batch_size, cfg.kl_weight)
  images_on_device = jnp.asarray(images)
  key = jax.random.fold_in(jax.random.key(config.pretrain.seed), PURPOSE_VAE)
  params, opt_state = state["params"], state["opt_state"]
  bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="VAE", unit="step")
  for step in bar:
    params, opt_state, metrics = step_fn(params, opt_state, images_on_device,
                                         jax.random.fold_in(key, step))
    done = step + 1
    if done % 50 == 0 or done == cfg.steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      bar.set_postfix(mse=f"{metrics['mse']:.4f}", kl=f"{metrics['kl']:.2f}")
      log_line(workdir, stage="vae", step=done, **metrics)
    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
      checkpoint.save(ckpt, done, {"params": params, "opt_state": opt_state})
  ckpt.wait_until_finished()
  return params


def sample_grid(config, sd, params, path, seed):
  cfg = config.pretrain
  generate = dreambooth.make_generate(sd, cfg.sample_steps)
  uncond = np.repeat(sd.tokenize([""]), cfg.sample_per_prompt, 0)
  rows = [generate(params, None, None, np.repeat(sd.tokenize([p]), cfg.sample_per_prompt, 0),
                   uncond, jax.random.key(seed), cfg.guidance_scale)
          for p in cfg.sample_prompts]
  files.save_grid(jnp.concatenate(rows), path, rows=len(rows), upscale=2)


def train_diffusion(config, sd, params, latent_data, workdir):
  cfg = config.pretrain.diffusion
  optimizer = pretrain.optimizer(cfg.learning_rate, cfg.steps, cfg.warmup, cfg.weight_decay)
  trained = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
  state = {"params": trained, "ema": jax.tree_util.tree_map(jnp.copy, trained),
           "opt_state": optimizer.init(trained)}
  ckpt = checkpoint.manager(workdir, subdir="checkpoints_diffusion")
  start, state = checkpoint.restore_latest(ckpt, state)
  step_fn = pretrain.make_diffusion_step(sd, optimizer, cfg.batch_size, cfg.caption_dropout,
                                         cfg.ema_decay)
  uncond_ids = jnp.asarray(sd.tokenize([""])[0])
  key = jax.random.fold_in(jax.random.key(config.pretrain.seed), PURPOSE_DIFFUSION)
  bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="UNet+text",
             unit="step")
  for step in bar:
    state, loss = step_fn(state, latent_data, uncond_ids, jax.random.fold_in(key, step))
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      bar.set_postfix(loss=f"{float(loss):.4f}")
      log_line(workdir, stage="diffusion", step=done, loss=float(loss))
    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
      checkpoint.save(ckpt, done, state)
    if done % cfg.sample_every == 0 and done < cfg.steps:
      sample_grid(config, sd, dict(params, **state["ema"]),
                  os.path.join(workdir, "samples", f"step_{done:06d}.png"), config.pretrain.seed)
  ckpt.wait_until_finished()
  return state["ema"]


def main(argv):
  del argv
  logs.quiet_libraries()
  config, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  started = time.time()

  images, captions = load_dataset(config)
  logging.info("dataset: %d images, %d distinct captions", len(images), len(set(captions)))
  model_config = config.model.copy_and_resolve_references()
  sd, _ = models.from_config(model_config)
  params = models.init_random(sd, model_config.init_seed)

  params["vae"] = train_vae(config, sd, params["vae"], images, workdir)
  mean, std = pretrain.encode_dataset(sd, params["vae"], images)
  scaling = 1.0 / float(jnp.std(mean))
  sd = pretrain.with_vae_scaling(sd, scaling)
  logging.info("VAE latent std %.4f -> scaling_factor %.4f", 1.0 / scaling, scaling)
  check = images[:8]
  recon = sd.decode_latents(params["vae"], sd.encode_images(params["vae"], check)[0])
  files.save_grid(np.concatenate([check, np.asarray(recon)]), os.path.join(workdir, "vae_recon.png"),
                  rows=2, upscale=2)

  latent_data = {"mean": mean * scaling, "std": std * scaling,
                 "input_ids": jnp.asarray(tokenize_variants(config, sd, captions))}
  ema = train_diffusion(config, sd, params, latent_data, workdir)
  params.update(ema)

  out = os.path.join(workdir, "base")
  models.save(sd, params, out)
  provenance.write(out, provenance.record(
      config, repo=REPO, steps={"vae": config.pretrain.vae.steps,
                                "diffusion": config.pretrain.diffusion.steps},
      data=provenance.data_record(f"synthetic_faces/{config.data.config}:train",
                                  arrays=[images], texts=captions, images=len(images))))
  sample_grid(config, sd, params, os.path.join(workdir, "samples.png"), config.pretrain.seed)
  logging.info("wrote %s in %.1f min", out, (time.time() - started) / 60)


if __name__ == "__main__":
  define_flags()
  app.run(main)
