"""HyperNetwork for Stable Diffusion 1.5 on one GPU host (e.g. 8 x A100 80 GB).

Trains on a pre-optimization run of configs/preopt_sd15_gpu.py (its weights dataset and
the same face folder: each identity's first photo is its reference) with a pretrained
CLIP vision tower as the image encoder (a local CLIP vision model folder: config.json +
flax_model.msgpack or model.safetensors; the paper used ViT-H), frozen by default
(train.encoder_lr_scale=0; e.g. 0.1 trains it at a tenth of the learning rate).
Mesh: `data` over all GPUs of the host, the frozen SD1.5 replicated; bf16 compute.
8 photos per GPU: 29.5 GB per GPU by XLA:CPU's estimate (docs/benchmarks.md
"Simulated"; the frozen encoder takes no backward pass): fits 40 GB and 80 GB cards.

    pip install -e '.[cuda]'
    python -m train.train_hypernet --config configs/hypernet_sd15_gpu.py \
        --config.model.path=/data/stable-diffusion-v1-5 \
        --config.data.weights=/data/preopt_sd15/weights \
        --config.data.folder=/data/celeba_hq_identities \
        --config.data.holdout_folder=/data/holdout_faces \
        --config.hypernet.encoder.path=/data/clip-vit-large-patch14-vision \
        --workdir /data/hypernet_sd15

Several nodes under SLURM (one task per GPU, `--config.distributed.initialize=True`):
docs/pods.md. Not run here (no GPU, no SD1.5 or CLIP weights); the same code trains the
mini world.
"""

from hdb_jax import config_file

# The sizes of openai/clip-vit-large-patch14's vision config.json (the encoder folder the
# docstring's command reads). The benchmarks build a random-weight encoder of this shape.
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                    num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)


def get_config():
  config = config_file.sibling(__file__, "hypernet_mini").get_config()  # same fields
  config.model = config_file.sibling(__file__, "sd15").sd15_model()
  config.model.compute_dtype = "bfloat16"       # weights and optimizer state stay float32
  config.class_name = "person"
  config.data.source = "face_folder"
  config.data.weights = ""                      # required: a preopt run's weights folder
  config.data.folder = ""                       # required: its face folder
  config.data.holdout_folder = ""               # optional: held-out faces to watch
  config.hypernet.width = 512
  config.hypernet.depth = 4
  config.hypernet.heads = 8
  config.hypernet.dtype = "bfloat16"
  config.hypernet.encoder = dict(kind="clip", path="", dtype="bfloat16")
  config.train.encoder_lr_scale = 0.0           # frozen pretrained encoder
  config.train.face_background_weight = None    # face_folder records have no face masks yet
  config.train.steps = 50000
  config.train.batch_size = 64                  # 8 per GPU
  config.train.learning_rate = 1e-4
  config.train.warmup = 1000
  config.train.eval_every = 2500
  config.train.eval_identities = 16
  config.train.checkpoint_every = 1000
  config.mesh.data = -1
  return config
