"""Many photos personalized at once: the identities of a block train as one batch.

`hdb personalize --image FOLDER` (a service personalizing many users, issue
"Performance" f). The single-photo pipeline (`personalize.py`) runs per identity; here a
block of G identities goes through every stage together:

    photos [G, S, S, 3] -> hypernetwork (one batch) -> relax (vmap over identities)
      -> fast finetuning: one optax step per call for all G, the identity axis sharded
         over the mesh's `data` axis; each identity's LoRA is applied to its own rows
         through the low-rank side path (no merged copy of the base per identity), the
         UNet and text encoder run once on the block's G x batch rows
      -> samples of every prompt for every identity in one sampling batch

Each identity draws its examples exactly as `finetune.train` does for one photo (the same
seed and step keys), so identity g's LoRA equals the single-photo result up to float
reassociation (side path vs merged kernels; tested).

Single host by design: the mesh is this process's devices and the photos are host arrays,
so a multi-process launch (jax.process_count() > 1, e.g. `--worker=all` on a TPU pod
slice) is refused in `load`. Run it on one host; more photos per second across hosts is
one independent command per host, each on its own folder of photos (docs/pods.md).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hdb_jax import diffusion, dreambooth, finetune, hypernet, lidb, lora, preopt
from hdb_jax import personalize_programs


def _identity_examples(sd, pools, rng, batch_size: int) -> dict:
  """One identity's examples, drawn as `dreambooth.pools_loss` draws them from its pools
  (leaves [M, ...]): input_ids [n, L], latents, noise [n, C, h, w], timesteps and loss
  weights [n] (n = batch_size x number of pools), and the pools' pixel weights [n, h, w]
  when they have them."""
  draw_rng, latent_rng, noise_rng = jax.random.split(rng, 3)
  batches = [dreambooth.draw(pool, key, batch_size)
             for pool, key in zip(pools, jax.random.split(draw_rng, len(pools)))]
  batch = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *batches)
  latents = diffusion.sample_latents(latent_rng, batch["mean"], batch["std"])
  noise, timesteps = diffusion.noise_and_timesteps(sd, noise_rng, latents)
  examples = {"input_ids": batch["input_ids"], "latents": latents, "noise": noise,
              "timesteps": timesteps, "weight": batch["weight"]}
  if "pixel_weights" in batch:
    examples["pixel_weights"] = batch["pixel_weights"]
  return examples


def block_losses(sd, lora_tree, frozen, pools, rng, batch_size: int):
  """Each identity's diffusion loss [G]: `lora_tree` leaves [G, in, r] / [G, r, out],
  `pools` leaves [G, M, ...]; one model call on the block's rows."""
  examples = jax.vmap(lambda p: _identity_examples(sd, p, rng, batch_size))(pools)
  count, per_identity = examples["weight"].shape
  flat = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), examples)
  with preopt.low_rank_side_path(lora_tree):
    context = sd.encode_text(frozen["text_encoder"], flat["input_ids"])
    losses = diffusion.loss_given_noise(sd, frozen["unet"], context, flat["latents"],
                                        flat["noise"], flat["timesteps"],
                                        flat.get("pixel_weights"))
  losses = losses.reshape(count, per_identity)
  weights = examples["weight"]
  return (losses * weights).sum(1) / weights.sum(1)


@dataclasses.dataclass
class BlockPersonalizer:
  """Jitted functions over blocks of `block` identities (see the module docstring)."""
  sd: object
  frozen: dict
  fingerprint: str          # the base's (checked against the hypernetwork's)
  hypernet_info: dict
  net_params: dict
  aux: dict
  cfg: object
  block: int
  tokens: dict              # prompt -> token ids [L]
  instance_prompt: str
  predict: object           # (net params, photos [G, S, S, 3]) -> LiDB train [G, ...]
  start: object             # (LiDB train, aux) -> (trained, fixed, opt state), leaves [G, ...]
  encode: object            # (vae params, photos [G, S, S, 3]) -> pool (leaves [G, M, ...])
  step: object              # (trained, opt, fixed, frozen, aux, pools, rng) -> (.., losses [G])
  generate: object          # dreambooth.make_generate_per_identity_lora's
  to_lora: object           # (trained + fixed layers, aux) -> LoRAs, leaves [G, ...]
  learned_aux: bool = False # the hypernetwork learned its aux matrices (in `aux`)


def load(config, prompts: list[str], block: int, mesh=None) -> BlockPersonalizer:
  """Build the models and the block functions (compiled on first use, once per process).
  `mesh`: the identity axis is sharded over its `data` axis (default: all devices; the
  block must divide evenly)."""
  from hdb_jax import models
  if jax.process_count() > 1:
    raise ValueError(
        f"batched personalization runs on one host (its mesh is this process's devices), "
        f"but this is process {jax.process_index()} of {jax.process_count()} of a "
        f"multi-process launch: run it on one host, or one command per host on its own "
        f"photos (docs/pods.md)")
  cfg = config.personalize
  if cfg.get("augment_crops", 0) or cfg.get("prior_images", 0):
    raise ValueError("batched personalization finetunes on the photo and its mirror image "
                     "only: set personalize.augment_crops=0 and personalize.prior_images=0, "
                     "or personalize one photo at a time")
  relax_lidb = cfg.get("relax", "lora") == "lidb"
  sd, frozen = models.load_or_build(config.model)
  params, info = hypernet.read(cfg.hypernet)
  spec = info["lidb_spec"]
  net_params, learned_aux = hypernet.split_aux(params, hypernet.weight_layout(spec))
  aux = learned_aux if learned_aux is not None else lidb.make_aux(spec)
  fingerprint = personalize_programs.check_pair(spec, frozen, info, cfg.hypernet,
                                                sd.image_size)
  net = hypernet.make(hypernet.weight_layout(spec), personalize_programs.net_config(info),
                     personalize_programs.encoder_of(info))
  iterations = int(cfg.iterations or info["hypernet"]["iterations"])
  instance = config.instance_prompt.format(token=config.token, class_name=config.class_name)
  texts = [instance, ""] + list(prompts)
  tokens = dict(zip(texts, sd.tokenize(texts).tolist()))
  mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",),
                               axis_types=(jax.sharding.AxisType.Auto,))
  if block % mesh.shape["data"]:
    raise ValueError(f"block {block} does not split over {mesh.shape['data']} devices")
  per_identity, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  tx = finetune.optimizer_of(cfg)

  def start(predicted, aux):
    def one(train):  # finetune.start_of, with the (shared) aux matrices kept out of `fixed`
      relaxed = (finetune.initial_lidb(train, aux, cfg.rank) if relax_lidb
                 else finetune.initial_lora(train, aux, cfg.rank))
      return finetune.split(relaxed, cfg.train_text_encoder)
    trained, fixed = jax.vmap(one)(predicted)
    return trained, fixed, jax.vmap(tx.init)(trained)

  def block_lora(layers, aux):
    """The block's layers (leaves [G, ...]) -> its LoRAs: LiDB values through `aux`."""
    return jax.vmap(lora.lidb_factors, in_axes=(0, None))(layers, aux) if relax_lidb else layers

  def encode(vae_params, photos):
    views = jnp.stack([photos, photos[:, :, ::-1]], 1) if cfg.hflip else photos[:, None]
    count, num_views = views.shape[:2]
    mean, std = sd.encode_images(vae_params, views.reshape((-1,) + views.shape[2:]))
    unflat = lambda x: x.reshape((count, num_views) + x.shape[1:])
    ids = jnp.broadcast_to(jnp.asarray(tokens[instance], jnp.int32),
                           (count, num_views, len(tokens[instance])))
    pool = {"mean": unflat(mean), "std": unflat(std), "input_ids": ids,
            "weight": jnp.ones((count, num_views), jnp.float32)}
    face = personalize_programs.pixel_weights(cfg, mean.shape[-2:])  # [h, w] or None
    if face is not None:
      pool["pixel_weights"] = jnp.broadcast_to(face, (count, num_views) + face.shape)
    return (pool,)

  def step(trained, opt_state, fixed, frozen, aux, pools, rng):
    def total(trained):  # identities share no params: d(sum)/d(lora_g) = d(loss_g)/d(lora_g)
      losses = block_losses(sd, block_lora({**trained, **fixed}, aux), frozen, pools, rng,
                            cfg.batch_size)
      return losses.sum(), losses
    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(trained)
    updates, opt_state = jax.vmap(tx.update)(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, losses

  s, r = per_identity, replicated
  return BlockPersonalizer(
      sd=sd, frozen=frozen, fingerprint=fingerprint, hypernet_info=info, net_params=net_params, aux=aux, cfg=cfg, block=block,
      tokens=tokens, instance_prompt=instance,
      predict=jax.jit(lambda p, x: personalize_programs.predict_scaled(net, p, x, iterations,
                                                                       cfg),
                      in_shardings=(r, s), out_shardings=s),
      start=jax.jit(start, in_shardings=(s, r), out_shardings=s),
      encode=jax.jit(encode, in_shardings=(r, s), out_shardings=s),
      step=jax.jit(step, in_shardings=(s, s, s, r, r, s, r), out_shardings=s,
                   donate_argnums=(0, 1)),
      to_lora=jax.jit(block_lora, in_shardings=(s, r), out_shardings=s),
      generate=dreambooth.make_generate_per_identity_lora(sd, cfg.sample_steps),
      learned_aux=learned_aux is not None)


def run(p: BlockPersonalizer, photos: np.ndarray, progress=None) -> dict:
  """photos [n <= block, S, S, 3] in [-1, 1] -> {"lora": leaves [n, ...] (NumPy),
  "lidb": the same as LiDB train values, leaves [n, ...] (the prediction for steps 0, the
  finetuned rank-r' values for relax "lidb"; None for a LoRA relaxation), "losses":
  [steps, n], "seconds": per stage}. A short last block is padded with copies of its
  first photo (their results are dropped)."""
  count = len(photos)
  if not 0 < count <= p.block:
    raise ValueError(f"a block holds 1 to {p.block} photos, got {count}")
  padded = np.concatenate([photos, np.repeat(photos[:1], p.block - count, 0)]).astype(np.float32)
  seconds, began = {}, time.perf_counter()
  predicted = p.predict(p.net_params, padded)
  seconds["predict"] = time.perf_counter() - began
  began = time.perf_counter()
  if p.cfg.steps:
    trained, fixed, opt_state = p.start(predicted, p.aux)
    pools = p.encode(p.frozen["vae"], padded)
    key, losses = jax.random.key(p.cfg.seed), []
    for step in (progress or (lambda x: x))(range(p.cfg.steps)):
      trained, opt_state, loss = p.step(trained, opt_state, fixed, p.frozen, p.aux, pools,
                                        jax.random.fold_in(key, step))
      losses.append(loss)
    losses = np.asarray(jnp.stack(losses))[:, :count]
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError("fast finetuning: the loss is not finite for photos "
                               f"{sorted(set(np.nonzero(~np.isfinite(losses))[1]))} of the block")
    tuned = p.to_lora({**trained, **fixed}, p.aux)
    compact = {**trained, **fixed} if p.cfg.get("relax", "lora") == "lidb" else None
  else:  # hypernetwork only: its rank-1 residuals as LoRAs
    tuned = jax.vmap(lora.lidb_factors, in_axes=(0, None))(predicted, p.aux)
    losses, compact = np.zeros((0, count)), predicted
  first_rows = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x)[:count], tree)
  tuned, compact = first_rows(tuned), None if compact is None else first_rows(compact)
  seconds["finetune"] = time.perf_counter() - began
  return {"lora": tuned, "lidb": compact, "losses": losses, "seconds": seconds}


def sample(p: BlockPersonalizer, lora_block, prompts: list[str], seed: int = 0) -> np.ndarray:
  """Every identity's samples of `prompts` in one batch -> [n, len(prompts), per_prompt,
  H, W, 3]; `lora_block` leaves [n, ...] (n <= block: padded to the block)."""
  count = jax.tree_util.tree_leaves(lora_block)[0].shape[0]
  padded = jax.tree_util.tree_map(
      lambda x: np.concatenate([x, np.repeat(x[:1], p.block - count, 0)]), lora_block)
  per_identity = np.repeat(np.asarray([p.tokens[t] for t in prompts], np.int32),
                           p.cfg.per_prompt, 0)                       # [n_prompts x k, L]
  cond = np.tile(per_identity, (p.block, 1))
  uncond = np.repeat(np.asarray([p.tokens[""]], np.int32), len(cond), 0)
  images = np.asarray(p.generate(p.frozen, padded, cond, uncond, jax.random.key(seed),
                                 np.float32(p.cfg.guidance_scale)))
  return images.reshape((p.block, len(prompts), p.cfg.per_prompt) + images.shape[1:])[:count]
