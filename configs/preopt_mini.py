"""Pre-optimization on the CPU mini world: LiDB weights of every synthetic_faces train identity.

Uses the committed mini base (configs/mini.py, assets/mini_base) and the photo reference
image of each identity (and its mirror image): 400 Adam steps at lr 5e-3, prompt
"a sks face", face-masked loss (background weight 0.1), one shared random start. The
mesh's `data` axis spans 2 host devices (the 2 cores; results do not depend on the device
count), 8 identities per device and block:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.preoptimize \
        --config configs/preopt_mini.py --workdir workdir/preopt_mini

(2,400 identities in ~40 min here.) The committed weights (assets/mini_preopt) are the
first 1,200 identities, the session's time budget: the same command with
`--config.data.max_identities=1200`. All 2,400 from them (computes the other 1,200 only):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train.preoptimize \
        --config configs/preopt_mini.py --workdir workdir/preopt_all \
        --config.preopt.extend=assets/mini_preopt/weights

Without XLA_FLAGS it runs on one device, 8 identities per block, ~1.6x slower. Fewer
identities, or the random stand-in data on the tiny random-init model (smoke runs, tests
and benchmarks):

    python -m train.preoptimize --config configs/preopt_mini.py --workdir workdir/preopt \
        --config.data.max_identities=64
    python -m train.preoptimize --config configs/preopt_mini.py:tiny --workdir workdir/preopt_tiny

Output: <workdir>/weights (hdb_jax/weights_dataset.py), summary.json, losses.csv.
Kill it any time (SIGTERM/Ctrl-C checkpoint first); the same command continues.
Tuning on the first mini base (32 identities, eval loss with fixed noise before -> after,
and the recognizer's identity accuracy of "a sks face" samples, base 0.33-0.34): 100
steps at lr 2e-3 / 5e-3 / 1e-2: 0.111 -> 0.097 / 0.093 / 0.091, accuracy 0.44 / 0.46 /
0.47; 300 steps at 5e-3 / 1e-2 / 2e-2: 0.084 / 0.085 / 0.091, accuracy 0.53 / 0.54 /
0.51. At 300 steps, lr 5e-3 (accuracy): 1 photo 0.52; 4 photos 0.51; all 8 views with
their captions 0.46 (0.50 face-masked); 1 photo face-masked 0.55 (0.56 with a shared
start); 1 photo, 600 steps 0.60. docs/mini_world.md has the table.
"""

import ml_collections

from hdb_jax import config_file


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """variant "": the mini world. "tiny": configs/tiny.py's random-init model on random
  stand-in images (smoke runs, tests and benchmarks without the committed base)."""
  config = ml_collections.ConfigDict()
  source = config_file.sibling(__file__, "tiny" if variant == "tiny" else "mini")
  config.model = source.tiny_model() if variant == "tiny" else source.mini_model()
  config.lidb = dict(seed=0, a=100, b=50, rank=1,
                     targets=dict(unet=r"/attn[12]/(to_q|to_k|to_v|to_out_0)$",
                                  text_encoder=r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$"))
  config.token = "sks"
  config.class_name = "face"
  config.prompt = "a {token} {class_name}"

  # Identities: synthetic_faces/<config>:<split> records grouped by identity; each trains
  # on `num_images` of its style-`photo_style` records (-1: any style; the reference
  # photo comes first), with `prompt`, or with captions=True each record's own caption
  # with the identifier before the class word ("a sketch of a sks face on a ...").
  # source "face_folder": your photos in `folder` (one subfolder or file per identity).
  # source "random": `random_identities` identities of random uint8 images (no dataset).
  config.data = dict(source="synthetic_faces", config="default", split="train", data_dir="",
                     folder="", num_images=1, photo_style=0, captions=False, max_identities=0,
                     random_identities=64, random_seed=0)
  if variant == "tiny":
    config.data.source = "random"

  config.preopt = dict(
      steps=400, batch_size=1, learning_rate=5e-3, seed=0, hflip=True, loss_window=10,
      per_device_block=8,
      residual="side",          # "side" (low-rank side path) or "merge" (vmap of merge)
      # Face-masked diffusion loss: per-pixel weight 1 on the person, this on the
      # background (the records' face_mask on the latent grid); None: plain loss.
      face_background_weight=0.1,
      # One random D_train start for all identities (else one per identity): the
      # hypernetwork's weight-space targets then differ only by what was learned.
      shared_init=True,
      init_seed=-1,             # seed of the start(s); -1: `seed` (another seed, same start:
                                # only the training noise differs; see analyze_targets)
      weight_decay=0.0,         # > 0: AdamW, decoupled decay towards zero
      eval_batch_size=16,       # fixed-noise eval loss before/after per identity; 0: skip
      remat="none",             # "dots": recompute all but weight matmuls in the backward
                                # pass (less memory, ~1/3 more compute; hdb_jax/preopt.py)
      checkpoint_every_blocks=8,
      # A finished weights dataset of this same run on fewer identities (a smaller
      # data.max_identities): a new workdir copies its shards and computes only the
      # identities after them (the weights of an identity do not depend on the others).
      extend="")
  if variant == "tiny":
    config.preopt.face_background_weight = None  # random images have no face masks
  config.mesh = dict(data=-1)   # devices on the data axis; -1: all (every process's)
  # Multi-host: initialize=True calls jax.distributed.initialize(), with no arguments on
  # TPU pods and SLURM (auto-detected), or with the coordinator/process fields below.
  config.distributed = dict(initialize=False, coordinator_address="", num_processes=0,
                            process_id=-1, cpu_collectives="")  # "gloo": CPU multi-process
  return config
