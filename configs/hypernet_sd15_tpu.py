"""HyperNetwork for Stable Diffusion 1.5 on a TPU pod slice (e.g. v4-32: 16 chips, 4 hosts).

configs/hypernet_sd15_gpu.py on every chip of every host: each process reads its own
rows of each global batch; `jax.distributed.initialize()` with no arguments finds the
pod. The frozen SD1.5 can be split along an `fsdp` mesh axis (mesh.fsdp=2: large
arrays halved across chip pairs, the batch on the remaining `data` axis).

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
        cd hdb-jax && . .venv/bin/activate && python -m train.train_hypernet \
        --config configs/hypernet_sd15_tpu.py \
        --config.model.path=/mnt/shared/stable-diffusion-v1-5 \
        --config.data.weights=/mnt/shared/preopt_sd15/weights \
        --config.data.folder=/mnt/shared/celeba_hq_identities \
        --config.data.holdout_folder=/mnt/shared/holdout_faces \
        --config.data.data_dir=/mnt/shared/tfds \
        --config.hypernet.encoder.path=/mnt/shared/clip-vit-large-patch14-vision \
        --workdir /mnt/shared/hypernet_sd15"

The workdir on a path every host shares (orbax checkpoints are written by all processes).
The whole way from an empty slice (data folder built once into data_dir, pre-optimization,
this, evaluation, export), resuming and watching: docs/pods.md. Not run here (no TPU, no
SD1.5 or CLIP weights); the multi-process code path is tested on CPU processes
(tests/test_hypernet_multiprocess.py).
"""

from hdb_jax import config_file


def get_config():
  config = config_file.sibling(__file__, "hypernet_sd15_gpu").get_config()
  # 8 per chip on 16 chips. XLA:CPU's memory analysis of the step at 512 px (bf16
  # compute, model.attention "auto" and model.remat "blocks" from configs/sd15.py, the
  # frozen CLIP encoder without a backward pass; benchmarks/simulate_sd15.py,
  # docs/benchmarks.md "Simulated") is 27.8 GB per device at 8 photos with the frozen
  # SD1.5 stored in bf16 (29.5 GB in float32): under 90% of a v4 chip's 32 GB (an upper
  # estimate; ~12 GB on paper). With bf16 compute the stored bf16 base computes the same.
  config.model.param_dtype = "bfloat16"
  config.train.batch_size = 128
  config.mesh.data = -1                         # every chip of every host
  config.mesh.fsdp = 1
  config.distributed.initialize = True          # no arguments: auto-detected on TPU VMs
  return config
