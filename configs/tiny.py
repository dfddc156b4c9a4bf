"""Tiny SD-like model built from this config (random init): the CPU smoke world.

LiDB DreamBooth of the example subject on a model with SD1.5's component classes at toy
sizes (32x32 images, 8x8x4 latents). Runs in a few minutes on a 2-core CPU and writes
real artefacts (lidb.safetensors, samples.png); the base is untrained, so the samples
show the subject only as far as a few hundred steps teach it.

    python -m train.lidb_dreambooth --config configs/tiny.py --workdir workdir/hdb_tiny

Inspect sizes without allocating weights:

    hdb info --config configs/tiny.py
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model() -> ml_collections.ConfigDict:
  """Architecture of the tiny world (SD1.5 classes, toy sizes)."""
  model = ml_collections.ConfigDict()
  model.path = ""  # empty: build from the architecture below with random init
  # How it computes (hdb_jax/models.py RunOptions; none changes the params or the results
  # beyond rounding): compute dtype, storage dtype of the frozen base, attention kernel
  # ("xla" | "auto" | "cudnn" | "pallas" | "chunked"), per-block rematerialization ("none" |
  # "blocks" | "blocks_min").
  model.compute_dtype = "float32"
  model.param_dtype = "float32"
  model.attention = "xla"
  model.remat = "none"
  model.init_seed = 0
  # PyTorch .bin weights are pickles, which can run code when read: off unless you trust them
  model.allow_pickle = False
  model.tokenizer_path = os.path.join(REPO, "assets", "mini_tokenizer")
  model.unet = dict(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=32,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  model.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
      block_out_channels=(32, 32, 32), norm_num_groups=32, sample_size=32,
      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
      scaling_factor=0.18215)
  model.text_encoder = dict(
      vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
      projection_dim=32, bos_token_id=785, eos_token_id=786, pad_token_id=786)
  model.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon")
  return model


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = tiny_model()

  # LiDB residuals (docs/method.md, part 1). a, b clamp to the 32-wide tiny layers.
  config.lidb = dict(seed=0, a=100, b=50, rank=1,
                     targets=dict(unet=r"/attn[12]/(to_q|to_k|to_v|to_out_0)$",
                                  text_encoder=r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$"))

  # The subject: an image file, a folder of images, or a comma-separated list.
  config.images = os.path.join(REPO, "assets", "example_subject")
  config.token = "sks"  # the [V] identifier: a rare word of the tokenizer
  config.class_name = "face"
  config.instance_prompt = "a {token} {class_name}"

  config.train = dict(steps=300, batch_size=4, learning_rate=5e-3, seed=0, hflip=True,
                      checkpoint_every=100, log_every=10)
  # Prior preservation: class images sampled from the base with `prompt`, weighted loss.
  config.prior = dict(num_images=0, weight=1.0, prompt="a {class_name}", num_steps=20)

  config.sample = dict(
      prompts=("a {token} {class_name}", "a sketch of a {token} {class_name}",
               "a {token} {class_name} on a blue background"),
      per_prompt=4, num_steps=25, guidance_scale=5.0, seed=0, upscale=4)
  return config
