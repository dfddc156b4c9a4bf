r"""LiDB DreamBooth: personalize a Stable Diffusion model to one subject from 1..N images.

    python -m train.lidb_dreambooth --config configs/tiny.py --workdir workdir/hdb_tiny
    python -m train.lidb_dreambooth --config configs/sd15.py \
        --config.model.path=/data/sd15 --config.images=/data/me --workdir workdir/me

Trains the LiDB residuals (rank-1 LoRA through frozen random aux) of the UNet and text
encoder attention projections with prompt "a [V] <class>". Writes to --workdir:
  lidb.safetensors   the personalization (aux regenerated from its seed on load)
  samples.png        a grid: rows = config.sample.prompts, columns = seeds
  subject.png        the training images as the model sees them
  log.jsonl          loss every config.train.log_every steps
  checkpoints/       orbax; rerunning the same command resumes from the newest one
"""

import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import checkpoint, dreambooth, files, lidb, logs, models
from hdb_jax import params as params_lib

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.mark_flags_as_required(["config", "workdir"])

PURPOSE_INIT, PURPOSE_TRAIN, PURPOSE_PRIOR = 0, 1, 2


def read_subject_images(spec: str, size: int) -> np.ndarray:
  paths = [p for part in spec.split(",") if part.strip()
           for p in files.list_images(part.strip())]
  if not paths:
    raise app.UsageError("config.images is empty: give an image, a folder or a list")
  return np.stack([files.read_image(p, size) for p in paths])


def run(config, workdir: str) -> dict:
  """Train (or resume) and write the artefacts; returns the final LiDB train pytree, or
  None when stopped by SIGTERM / Ctrl-C (checkpointed; the same command continues)."""
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_path(os.path.join(workdir, "config.json")) as tmp, open(tmp, "w") as f:
    f.write(config.to_json(indent=2))

  sd, frozen = models.load_or_build(config.model)
  spec = lidb.make_spec(frozen, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  aux = lidb.make_aux(spec)
  logging.info("LiDB: %d layers, %d trainable values", spec.num_layers, spec.num_trainable)

  # The subject, encoded once by the frozen VAE.
  images = read_subject_images(config.images, sd.image_size)
  files.save_grid(images, os.path.join(workdir, "subject.png"), rows=1,
                  upscale=config.sample.upscale)
  words = dict(token=config.token, class_name=config.class_name)
  instance_ids = sd.tokenize([config.instance_prompt.format(**words)])
  subject = dreambooth.encode_subject(sd, frozen["vae"], images, config.train.hflip)
  pools = [dreambooth.make_pool(subject, instance_ids, 1.0)]
  logging.info("subject: %d images (%d with flips), prompt %r", len(images),
               subject["mean"].shape[0], config.instance_prompt.format(**words))

  seed_key = jax.random.key(config.train.seed)
  uncond_ids = sd.tokenize([""])
  if config.prior.num_images > 0:
    # Prior preservation: the base model's own samples of the class keep it general.
    generate_prior = dreambooth.make_generate(sd, config.prior.num_steps)
    prior_ids = sd.tokenize([config.prior.prompt.format(**words)] * config.prior.num_images)
    prior_images = generate_prior(
        frozen, None, None, prior_ids, np.repeat(uncond_ids, len(prior_ids), 0),
        jax.random.fold_in(seed_key, PURPOSE_PRIOR), config.sample.guidance_scale)
    prior = dreambooth.encode_subject(sd, frozen["vae"], np.asarray(prior_images), False)
    pools.append(dreambooth.make_pool(prior, prior_ids[:1], config.prior.weight))
    files.save_grid(prior_images, os.path.join(workdir, "prior.png"), rows=1,
                    upscale=config.sample.upscale)

  optimizer = optax.adam(config.train.learning_rate)
  train = lidb.init(spec, jax.random.fold_in(seed_key, PURPOSE_INIT))
  state = {"train": train, "opt_state": optimizer.init(train)}
  ckpt = checkpoint.manager(workdir)
  start, state = checkpoint.restore_latest(ckpt, state)
  if start:
    logging.info("resuming from step %d", start)

  step_fn = dreambooth.make_train_step(sd, optimizer, config.train.batch_size)
  train_key = jax.random.fold_in(seed_key, PURPOSE_TRAIN)
  train, opt_state = state["train"], state["opt_state"]
  log_path = os.path.join(workdir, "log.jsonl")
  bar = tqdm(range(start, config.train.steps), initial=start, total=config.train.steps,
             desc="LiDB DreamBooth", unit="step")
  stop = checkpoint.StopFlag()  # SIGTERM / Ctrl-C: checkpoint at the next step and exit
  try:
    for step in bar:
      train, opt_state, loss = step_fn(train, opt_state, frozen, aux, tuple(pools),
                                       jax.random.fold_in(train_key, step))
      done = step + 1
      logging_now = done % config.train.log_every == 0 or done == config.train.steps
      saving = (done % config.train.checkpoint_every == 0 or done == config.train.steps
                or stop.requested)
      if logging_now or saving:  # never checkpoint a state that is not finite
        loss = float(loss)
        if not np.isfinite(loss):
          ckpt.wait_until_finished()
          raise FloatingPointError(f"step {done}: loss is {loss}; stopped, the last good "
                                   f"checkpoint is in {workdir}/checkpoints")
      if logging_now:
        bar.set_postfix(loss=f"{loss:.4f}")
        with open(log_path, "a") as f:
          f.write(json.dumps({"step": done, "loss": loss}) + "\n")
      if saving:
        checkpoint.save(ckpt, done, {"train": train, "opt_state": opt_state})
      if stop.requested and done < config.train.steps:
        ckpt.wait_until_finished()
        logging.warning("stopped at step %d: rerun the same command to continue", done)
        return None
  finally:
    stop.restore()
  ckpt.wait_until_finished()

  out = os.path.join(workdir, "lidb.safetensors")
  lidb.save(out, train, spec, params_lib.fingerprint(frozen, spec.layers),
            extra_metadata={"token": config.token, "class_name": config.class_name,
                            "steps": str(config.train.steps)})
  logging.info("wrote %s (%d values)", out, spec.num_trainable)

  # Samples: rows = prompts, columns = seeds; compiled once for all rows.
  generate = dreambooth.make_generate(sd, config.sample.num_steps)
  per_prompt = config.sample.per_prompt
  rows = []
  for i, prompt in enumerate(config.sample.prompts):
    cond_ids = np.repeat(sd.tokenize([prompt.format(**words)]), per_prompt, 0)
    rows.append(generate(frozen, train, aux, cond_ids, np.repeat(uncond_ids, per_prompt, 0),
                         jax.random.key(config.sample.seed), config.sample.guidance_scale))
  grid_path = os.path.join(workdir, "samples.png")
  files.save_grid(jnp.concatenate(rows), grid_path, rows=len(rows),
                  upscale=config.sample.upscale)
  logging.info("wrote %s", grid_path)
  return train


def main(argv):
  del argv
  logs.quiet_libraries()
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
