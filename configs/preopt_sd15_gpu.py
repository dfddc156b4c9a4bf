"""Pre-optimization for Stable Diffusion 1.5 on one GPU host (e.g. 8 x A100 80 GB).

Every identity of a face folder (e.g. CelebA-HQ, one image or one subfolder per identity,
the paper used 15K) gets its LiDB weights: 200 Adam steps at lr 2e-3, its photo and its
mirror image, prompt "a sks person". Mesh: 1 axis `data` over all GPUs of the host; 8
identities vmapped per GPU (64 per block on 8 GPUs; 26 GB per GPU by XLA:CPU's estimate
with cuDNN/chunked attention and per-block remat from configs/sd15.py, so 40 GB cards
too). bf16 compute, fp32 weights and optimizer state. The workdir holds the weights dataset,
the summary and orbax progress; rerun the same command after any interruption.

    pip install -e '.[cuda]'
    python -m hdb_jax.data --folder /data/celeba_hq_identities --image_size 512  # build once
    python -m train.preoptimize --config configs/preopt_sd15_gpu.py \
        --config.model.path=/data/stable-diffusion-v1-5 \
        --config.data.folder=/data/celeba_hq_identities --workdir /data/preopt_sd15

On paper (docs/benchmarks.md): ~25 identity-steps/s per A100 at block 8, i.e. 15K
identities x 200 steps in ~4 h on 8 GPUs. Not run here (no GPU, no SD1.5 weights).
"""

from hdb_jax import config_file


def get_config():
  config = config_file.sibling(__file__, "preopt_mini").get_config()  # same fields as the mini world
  config.model = config_file.sibling(__file__, "sd15").sd15_model()
  config.model.compute_dtype = "bfloat16"        # weights and optimizer state stay float32
  config.class_name = "person"
  config.data.source = "face_folder"
  config.data.folder = ""                        # required: --config.data.folder=...
  config.preopt.steps = 200
  config.preopt.face_background_weight = None  # face_folder records have no face masks yet
  config.preopt.batch_size = 1
  config.preopt.learning_rate = 2e-3
  config.preopt.per_device_block = 8
  config.preopt.eval_batch_size = 4
  config.preopt.checkpoint_every_blocks = 4      # ~13 min of work between checkpoints
  config.mesh.data = -1                          # all local GPUs
  return config
