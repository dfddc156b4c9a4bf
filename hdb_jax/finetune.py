"""Rank-relaxed fast finetuning: a predicted LiDB residual -> rank r' -> tens of steps.

HyperDreamBooth's second stage (docs/method.md): the hypernetwork's prediction is
re-parameterized at a higher rank r' (the same residual, with extra components free to
learn) and trained with Adam and the diffusion loss on the one photo (and its mirror
image), prompt "a [V] <class>". Where the relaxation lives is `config.personalize.relax`
(`start_of`): "lora", the paper's, a LoRA of rank r' (`initial_lora`: `relax.relax_lora`);
"lidb", inside the LiDB subspace (`initial_lidb`: D_train [a, r'], U_train [r', b] with
the aux matrices frozen, in `fixed[AUX]`; `lora_of` turns a state into its LoRA). The
recipe's other switches (`optimizer_of`: warmup, cosine schedule, the text encoder's
rate) are config keys too; docs/results.md "Levers" measured each. Runs without a
prediction (the "no hypernetwork" ablation, LoRA DreamBooth) start from `random_start`
instead: the usual LoRA init as peft makes it (`lora.random_init`: kaiming-uniform
`down`, zero `up`). The result is a normal LoRA pytree
({component: {layer: {"down" [in, r'], "up" [r', out]}}}) that `lora.save` writes and
`hdb export` converts as it is; inside the LiDB subspace it is also a LiDB of rank r'
(`lidb_of`), which `lidb.save` writes in a tenth of the bytes on SD1.5.

The frozen base and the fixed part of the LoRA (the text encoder's layers when they are
not trained) are arguments of the jitted step, never closed over.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdb_jax import dreambooth, lora, relax

# In `fixed`, the aux matrices of a finetuning inside the LiDB subspace (relax "lidb").
AUX = "aux"
RELAXATIONS = ("lora", "lidb")
# The second factor of a layer: a LoRA's "up" [r', out], or "U_train" [r', b] inside the
# LiDB subspace (`up_lr_scale`).
UP_FACTORS = ("up", "U_train")
SCHEDULES = ("constant", "cosine")


def initial_lora(train: Mapping, aux: Mapping, rank: int) -> dict:
  """Predicted LiDB train values -> a LoRA of rank `rank` with exactly their residual
  (traceable: jit it, or call it eagerly)."""
  return relax.relax_lora(lora.lidb_factors(train, aux), rank)


def initial_lidb(train: Mapping, aux: Mapping, rank: int) -> dict:
  """Predicted LiDB train values -> LiDB train values of rank `rank` with the same
  residual: the relaxation inside the LiDB subspace (relax "lidb"). Each layer's
  D_train [a, 1] @ U_train [1, b] is relaxed as a LoRA of the small [a, b] core
  (D_train [a, rank] orthonormal, U_train [rank, b]); the aux matrices stay frozen, so
  the trained values are ~rank x 26K on SD1.5 (~0.4 MB at rank 4) where a rank-`rank`
  LoRA has rank x 273K (`hdb info`: bytes_fp32_per_rank)."""
  cores = {c: {layer: {"down": w["D_train"], "up": w["U_train"]} for layer, w in layers.items()}
           for c, layers in train.items()}
  return {c: {layer: {"D_train": f["down"], "U_train": f["up"]} for layer, f in layers.items()}
          for c, layers in relax.relax_lora(cores, rank).items()}


def start_of(train: Mapping, aux: Mapping, cfg) -> tuple[dict, dict]:
  """The prediction -> (trained, fixed) by `cfg.relax` ("lora": `initial_lora`; "lidb":
  `initial_lidb`, with the aux matrices in `fixed[AUX]`). Traceable."""
  relaxation = cfg.get("relax", "lora")
  if relaxation not in RELAXATIONS:
    raise ValueError(f"config.personalize.relax must be one of {RELAXATIONS}, "
                     f"got {relaxation!r}")
  if relaxation == "lora":
    return split(initial_lora(train, aux, cfg.rank), cfg.train_text_encoder)
  trained, fixed = split(initial_lidb(train, aux, cfg.rank), cfg.train_text_encoder)
  return trained, {**fixed, AUX: dict(aux)}


def lora_of(trained: Mapping, fixed: Mapping) -> dict:
  """A finetuning state (trained, fixed) -> the whole LoRA {component: {layer: {"down",
  "up"}}}: the layers as they are, or, with `fixed[AUX]` (relax "lidb"), their LiDB
  values through the aux matrices (down = D_aux @ D_train, up = U_train @ U_aux)."""
  layers = {**trained, **{c: v for c, v in fixed.items() if c != AUX}}
  return lora.lidb_factors(layers, fixed[AUX]) if AUX in fixed else layers


def lidb_of(trained: Mapping, fixed: Mapping) -> dict | None:
  """A finetuning state inside the LiDB subspace (relax "lidb": `fixed[AUX]`) -> its LiDB
  train values {component: {layer: {"D_train" [a, r'], "U_train" [r', b]}}}: the same
  personalization as `lora_of`'s LoRA, as a rank-r' LiDB of the same aux matrices (~r' x
  26K values on SD1.5 against r' x 273K). None for a LoRA relaxation."""
  if AUX not in fixed:
    return None
  return {**trained, **{c: v for c, v in fixed.items() if c != AUX}}


def layer_shapes(aux: Mapping) -> dict:
  """{component: {layer: (in, out)}} of the layers a LiDB residual (and so the
  personalization's LoRA) changes, read from the aux matrices D_aux [in, a], U_aux [b, out]."""
  return {component: {layer: (int(np.shape(m["D_aux"])[0]), int(np.shape(m["U_aux"])[-1]))
                      for layer, m in layers.items()}
          for component, layers in aux.items()}


def random_start(aux: Mapping, rank: int, seed: int) -> dict:
  """The start of finetuning without a prediction: the usual LoRA init (peft's default:
  down [in, rank] ~ U(-1/sqrt(in), 1/sqrt(in)), up = 0; `lora.random_init`, keys from
  `seed` and each layer's path) on the layers of `aux`. Its residual is zero, as a relaxed
  zero prediction's, but its directions are random rather than the first unit vectors."""
  return lora.random_init(layer_shapes(aux), rank, seed)


def split(lora_tree: Mapping, train_text_encoder: bool) -> tuple[dict, dict]:
  """-> (trained layers, fixed layers): the text encoder's are fixed unless trained."""
  trained = {c: dict(layers) for c, layers in lora_tree.items()
             if train_text_encoder or c != "text_encoder"}
  fixed = {c: dict(layers) for c, layers in lora_tree.items() if c not in trained}
  return trained, fixed


def loss_fn(sd, trained, fixed, frozen, pools, rng, batch_size: int):
  """Diffusion loss of the base with the whole LoRA (`lora_of(trained, fixed)`) merged."""
  return dreambooth.pools_loss(sd, lora.merge(frozen, lora_of(trained, fixed)), pools, rng,
                               batch_size)


def optimizer(learning_rate: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam at a constant rate (the public ports: 1e-4 on SD1.5, ~40 steps): `optax.adamw`
  with the default weight decay 0 is Adam exactly. `weight_decay` > 0 makes it AdamW
  (benchmarks/finetune_step.py uses torch's 1e-2 on both sides); personalization and
  the evaluation's LoRA rows use 0."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def learning_rate_schedule(cfg):
  """config.personalize's rate: `learning_rate`, after `warmup_steps` of linear warmup
  from 0, then constant (`schedule` "constant") or a cosine decay to 0 at `steps`
  ("cosine"). A plain float when constant without warmup."""
  peak, warmup = float(cfg.learning_rate), int(cfg.get("warmup_steps", 0))
  schedule = cfg.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"config.personalize.schedule must be one of {SCHEDULES}, "
                     f"got {schedule!r}")
  if schedule == "cosine" and not warmup:
    return optax.cosine_decay_schedule(peak, max(int(cfg.steps), 1))
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(int(cfg.steps), warmup + 1))
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  return peak


def optimizer_of(cfg) -> optax.GradientTransformation:
  """config.personalize's optimizer: Adam at `learning_rate_schedule(cfg)`, each leaf at a
  multiple of that rate: the text encoder's layers at `text_encoder_lr_scale` (default 1),
  the second factor of each layer ("up" of a LoRA, "U_train" inside the LiDB subspace) at
  `up_lr_scale` (default 1; > 1 is LoRA+'s ratio, Hayou et al. 2024: the factor that
  starts at zero in the usual LoRA init learns faster), both for a text-encoder "up".
  With the defaults (constant, no warmup, scales 1) it is `optimizer(cfg.learning_rate)`.
  The schedule runs over `cfg.steps`; a run with other steps (`personalize.run(steps=)`)
  keeps it."""
  rate = learning_rate_schedule(cfg)
  text_encoder_scale = float(cfg.get("text_encoder_lr_scale", 1.0))
  up_scale = float(cfg.get("up_lr_scale", 1.0))
  if text_encoder_scale == 1.0 and up_scale == 1.0:
    return optimizer(rate)

  def scale_of(component: str, factor: str) -> float:
    return ((text_encoder_scale if component == "text_encoder" else 1.0)
            * (up_scale if factor in UP_FACTORS else 1.0))

  def labels(tree):  # {component: {layer: {factor: leaf}}} -> the same tree of scales
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(scale_of(path[0].key, path[-1].key)), tree)

  scales = {scale_of(c, f) for c in ("unet", "text_encoder") for f in ("down", "up")}
  return optax.multi_transform(
      {str(s): optimizer((lambda step, s=s: s * rate(step)) if callable(rate) else s * rate)
       for s in scales}, labels)


def make_step(sd, tx: optax.GradientTransformation, batch_size: int):
  """jit(step)(trained, opt_state, fixed, frozen, pools, rng) -> (trained, opt_state, loss)."""
  def step(trained, opt_state, fixed, frozen, pools, rng):
    loss, grads = jax.value_and_grad(
        lambda t: loss_fn(sd, t, fixed, frozen, pools, rng, batch_size))(trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def train(step_fn, trained, opt_state, fixed, frozen, pools, *, steps: int, seed: int,
          progress=None) -> tuple[dict, list[float]]:
  """The loop: `steps` calls of `step_fn` (`make_step`'s; it donates `trained` and
  `opt_state`) -> (the trained values after the last step, the loss per step): with
  `fixed`, `lora_of` makes them the whole LoRA, `lidb_of` the compact LiDB form.
  `progress(iterable)` wraps the loop (e.g. tqdm)."""
  key = jax.random.key(seed)
  losses = []
  for step in (progress or (lambda x: x))(range(steps)):
    trained, opt_state, loss = step_fn(trained, opt_state, fixed, frozen, tuple(pools),
                                       jax.random.fold_in(key, step))
    losses.append(loss)
  losses = [float(x) for x in losses]
  bad = [k for k, x in enumerate(losses) if not np.isfinite(x)]
  if bad:
    raise FloatingPointError(f"fast finetuning: the loss is {losses[bad[0]]} at step "
                             f"{bad[0] + 1} of {steps} (learning rate too high?); nothing kept")
  return trained, losses


def finetune(sd, frozen, lora_init: Mapping, pools, *, steps: int, learning_rate: float,
             batch_size: int, seed: int, train_text_encoder: bool = True, progress=None,
             step_fn=None) -> tuple[dict, list[float]]:
  """Train `lora_init` for `steps` steps on `pools` (`dreambooth.make_pool`) ->
  (the whole LoRA, loss per step). `progress(iterable)` wraps the loop (e.g. tqdm).
  `step_fn`: a `make_step(sd, optimizer(learning_rate), batch_size)` to reuse (one
  compilation per process for any photo); built here when not given."""
  # Copies: the step donates its input buffers, the caller keeps `lora_init`.
  trained, fixed = split(jax.tree_util.tree_map(jnp.array, lora_init), train_text_encoder)
  tx = optimizer(learning_rate)
  opt_state = tx.init(trained)
  step_fn = step_fn or make_step(sd, tx, batch_size)
  trained, losses = train(step_fn, trained, opt_state, fixed, frozen, pools, steps=steps,
                          seed=seed, progress=progress)
  return lora_of(trained, fixed), losses
