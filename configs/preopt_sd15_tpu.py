"""Pre-optimization for Stable Diffusion 1.5 on a TPU pod slice (e.g. v4-32: 4 hosts, 16 chips).

Same run as configs/preopt_sd15_gpu.py, multi-host: `jax.distributed.initialize()` (TPU
topology auto-detected), mesh `data` over all 16 chips, 8 identities per chip (128
per block), 200 Adam steps at lr 2e-3. Every host reads only its rows of each block and
writes its own shards; the workdir must be one shared folder (Filestore/NFS or a GCS FUSE
mount) for the orbax progress and the weights dataset. Build the face dataset once into a
shared data_dir before launching (concurrent builds of one TFDS folder would collide).

    python -m hdb_jax.data --folder /mnt/shared/celeba_hq_identities --image_size 512 \
        --data_dir /mnt/shared/tfds
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
        cd hdb-jax && pip install -e '.[tpu]' && python -m train.preoptimize \
        --config configs/preopt_sd15_tpu.py \
        --config.model.path=/mnt/shared/stable-diffusion-v1-5 \
        --config.data.folder=/mnt/shared/celeba_hq_identities \
        --config.data.data_dir=/mnt/shared/tfds --workdir /mnt/shared/preopt_sd15"

Preemption: the TPU VM sends SIGTERM; all hosts agree on it at the next step boundary,
save progress and exit 0; rerun the same command. On paper (docs/benchmarks.md): 15K
identities x 200 steps in ~2 h on a v4-32. Not run here (no TPU, no SD1.5 weights).
"""

from hdb_jax import config_file


def get_config():
  config = config_file.sibling(__file__, "preopt_sd15_gpu").get_config()
  # 32 GB HBM per v4 chip. XLA:CPU's memory analysis of this step at 512 px (bf16
  # compute, model.attention "auto" and model.remat "blocks" from configs/sd15.py;
  # benchmarks/simulate_sd15.py, docs/benchmarks.md): 26.3 GB at 8 identities per
  # device, an upper estimate (~10 GB on paper with the Pallas flash kernel). Without
  # memory-efficient attention and remat it was 57 GB, and 3 per chip were the most.
  config.preopt.per_device_block = 8
  config.preopt.checkpoint_every_blocks = 8
  config.mesh.data = -1                          # every chip of every host
  config.distributed.initialize = True           # no arguments: auto-detected on TPU VMs
  return config
