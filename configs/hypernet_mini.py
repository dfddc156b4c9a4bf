"""HyperNetwork on the CPU mini world: one reference photo -> its LiDB weights.

Trains on the pre-optimized weights of the mini world's train identities
(assets/mini_preopt, made on the committed base assets/mini_base) with their reference
photos, face-masked diffusion loss, 10,000 steps, and reports the held-out identities'
identity accuracy as it goes:

    python -m train.train_hypernet --config configs/hypernet_mini.py --workdir workdir/hypernet

With 2 host devices (the 2 cores) the batch is split over the mesh's `data` axis:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py --workdir workdir/hypernet

Kill it any time (SIGTERM/Ctrl-C checkpoint first); the same command continues.

The committed network, assets/mini_hypernet, is `:steps10k_all`: this recipe on all 2,400
pre-optimized identities (workdir/preopt_all/weights, made by the preoptimize command of
docs/hypernet.md "Results in the mini world"), without the held-out evaluation:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:steps10k_all --workdir workdir/hypernet_10k_all

`:steps5k` is the recipe before 10,000 steps: the comparison table's network
(assets/mini_hypernet_5k, on the same 2,400 identities with
--config.data.weights=workdir/preopt_all/weights) and assets/mini_hypernet_1200 (on
assets/mini_preopt's 1,200).

`configs/hypernet_mini.py:learnable_aux` is the committed learnable-aux network's recipe
(assets/mini_hypernet_aux): aux matrices learned with the network, no weight-space loss,
2,000 steps, the plain diffusion loss (it was trained before the face mask became this
config's default):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:learnable_aux --workdir workdir/hypernet_aux

`configs/hypernet_mini.py:k1` is the paper's k = 1 ablation (assets/mini_hypernet_k1): the
same recipe with one iteration, on assets/mini_preopt's 1,200 identities (no held-out
evaluation during training; it changes nothing in the weights):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:k1 --workdir workdir/hypernet_k1

Three levers of the hypernetwork (docs/results.md "Levers of the hypernetwork"), each the
5,000-step recipe on the same 1,200 identities with one change and no held-out evaluation
during training: `:s6` trains with s = 6 refinement steps (assets/mini_hypernet_s6),
`:alpha4` weighs the diffusion loss 4x (assets/mini_hypernet_alpha4), `:steps10k` trains
twice as long, 10,000 steps on the same warmup and cosine decay
(assets/mini_hypernet_steps10k; the lever that won, now the recipe):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:s6 --workdir workdir/hypernet_s6

`:mean_targets` trains on averaged targets (assets/mini_hypernet_mean_targets): the same 1,200
identities pre-optimized once more with another seed from the same start, and the two
runs averaged (train/average_targets.py has the two commands that make
workdir/preopt_mean/weights, which this variant reads):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:mean_targets --workdir workdir/hypernet_mean2

`:views4_targets` trains on targets pre-optimized from 4 photos of each identity (the
network still reads one), which this variant reads from workdir/preopt_views4/weights
(assets/mini_hypernet_views4_targets):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.preoptimize \
        --config configs/preopt_mini.py --workdir workdir/preopt_views4 \
        --config.data.max_identities=1200 --config.data.num_images=4
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.train_hypernet \
        --config configs/hypernet_mini.py:views4_targets --workdir workdir/hypernet_views4
"""

import os

import ml_collections

from hdb_jax import config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("", "steps5k", "learnable_aux", "k1", "s6", "alpha4", "mean_targets",
            "views4_targets", "steps10k", "steps10k_all")
# The networks trained before 10,000 steps became the recipe (docs/results.md "Levers of
# the hypernetwork": twice the steps, +0.036 held-out identity) ran 5,000.
STEPS_BEFORE = 5000


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """variant "" (the standard recipe), "steps5k", "learnable_aux", "k1", "s6", "alpha4",
  "mean_targets", "views4_targets", "steps10k" or "steps10k_all" (the committed network)."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/hypernet_mini.py: unknown variant {variant!r} "
                     f"(known: {', '.join(repr(v) for v in VARIANTS)})")
  config = ml_collections.ConfigDict()
  config.model = config_file.sibling(__file__, "mini").mini_model()
  config.token = "sks"
  config.class_name = "face"
  config.prompt = "a {token} {class_name}"
  # Targets (their LiDB spec comes with them) and the photos of their identities.
  # source "face_folder": `folder` (the pre-optimization's photos) and `holdout_folder`.
  config.data = dict(weights=os.path.join(REPO, "assets", "mini_preopt", "weights"),
                     source="synthetic_faces", config="default", split="train", data_dir="",
                     folder="", holdout_folder="", max_identities=0)

  config.hypernet = dict(
      # Sized for this CPU: hypernetwork forward+backward at batch 32 and s = 4 takes
      # 1.27 s at width 128 / depth 4 (ViT 128 / 4), 0.43 s at 96 / 2 (ViT 96 / 3).
      width=96, depth=2, heads=4, mlp_ratio=4,
      iterations=4,  # refinement steps s (training; settable at prediction)
      # kind "vit": trained from scratch (65 tokens here); "clip": a pretrained CLIP
      # vision folder at `path` (SD1.5 configs), trained at encoder_lr_scale x lr.
      encoder=dict(kind="vit", patch=4, width=96, depth=3, heads=4, path=""),
      # Learnable aux: the aux matrices become params shared by all identities, trained
      # by the diffusion loss; needs train.beta=0 (the targets were made with the seed's
      # aux). Predicted LiDB files then store the aux matrices.
      learnable_aux=False,
      dtype="float32")

  config.train = dict(
      steps=10000, batch_size=16, learning_rate=3e-4, warmup=200, weight_decay=0.01,
      clip=1.0, seed=0, encoder_lr_scale=1.0,
      alpha=1.0,                 # diffusion loss with the predicted weights applied
      beta=1.0,                  # weight-space loss to the pre-optimized weights
      weight_loss="params",      # "params": ||theta_hat - theta||^2; "residual": of D @ U
      hflip=True, jitter=0.1,    # flip both; brightness/contrast of the encoder input only
      # Face-masked diffusion loss: background pixels of the renderer's face mask weigh
      # this much (None: the plain loss). +0.026 held-out identity at 2,000 steps
      # (docs/hypernet.md).
      face_background_weight=ml_collections.config_dict.FieldReference(0.1, field_type=float),
      remat="none",              # "dots": recompute all but weight matmuls (less memory)
      log_every=25, checkpoint_every=250,
      eval_every=1000, eval_identities=32, eval_samples=2, sample_steps=25,
      guidance_scale=4.0)
  # Devices on data x fsdp (-1: all, of every process); with fsdp > 1 the frozen base's
  # arrays of >= fsdp_min_size values are split along fsdp (gathered where used).
  config.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**18)
  config.distributed = dict(initialize=False, coordinator_address="", num_processes=0,
                            process_id=-1, cpu_collectives="")
  if variant in ("steps5k", "k1", "s6", "alpha4", "mean_targets", "views4_targets"):
    config.train.steps = STEPS_BEFORE
  if variant == "learnable_aux":
    config.hypernet.learnable_aux = True
    config.train.beta = 0.0
    config.train.steps = 2000
    config.train.face_background_weight = None
  elif variant == "k1":
    config.hypernet.iterations = 1
    config.train.eval_every = 0
  elif variant == "s6":
    config.hypernet.iterations = 6
    config.train.eval_every = 0
  elif variant == "alpha4":
    config.train.alpha = 4.0
    config.train.eval_every = 0
  elif variant in ("steps10k", "steps10k_all"):  # the standard steps, no held-out eval
    config.train.eval_every = 0
    if variant == "steps10k_all":
      config.data.weights = os.path.join("workdir", "preopt_all", "weights")
  elif variant in ("mean_targets", "views4_targets"):
    run = {"mean_targets": "preopt_mean", "views4_targets": "preopt_views4"}[variant]
    config.data.weights = os.path.join("workdir", run, "weights")
    config.train.eval_every = 0
  return config
