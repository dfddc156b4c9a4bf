"""Stable Diffusion 1.5: LiDB DreamBooth on one GPU host, weights from a local folder.

The folder is a diffusers-format SD1.5 checkout (unet/ vae/ text_encoder/ tokenizer/
scheduler/) with Flax or PyTorch safetensors weights; there is no download.

    pip install -e '.[cuda]'
    python -m train.lidb_dreambooth --config configs/sd15.py \
        --config.model.path=/data/stable-diffusion-v1-5 \
        --config.images=/data/me/ --workdir workdir/hdb_sd15_me

Personalize from one photo (a hypernetwork trained with configs/hypernet_sd15_gpu.py on
this base; the face is found and cropped by dlib, `pip install -e '.[faces]'`):

    hdb personalize --config configs/sd15.py --image me.jpg --out workdir/me \
        --set model.path=/data/stable-diffusion-v1-5 --set personalize.hypernet=/data/hypernet_sd15/hypernet

Sizes, with no weights read (the architecture below mirrors SD1.5's config.json files):

    hdb info --config configs/sd15.py     # lidb_layers 176, lidb_trainable_params 26400
"""

import ml_collections


def sd15_model() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.path = ""  # set to the local SD1.5 folder; the architecture below is then read from it
  # How it computes (hdb_jax/models.py RunOptions; none changes the params or the results
  # beyond rounding): compute dtype, storage dtype of the frozen base, attention kernel
  # ("xla" | "auto" | "cudnn" | "pallas" | "chunked"), per-block rematerialization ("none" |
  # "blocks" | "blocks_min").
  # At 512 px the attention maps dominate memory: "auto" takes cuDNN flash attention on GPU
  # (bf16), the Pallas flash kernel on TPU, chunked XLA attention where neither fits (and
  # XLA's on CPU); "blocks" recomputes each block in the backward pass (~+18% FLOPs).
  # XLA's memory analysis per device (docs/benchmarks.md "Simulated"): fast finetuning
  # 9.2 GB in float32 (18-19 GB without these two). param_dtype "bfloat16" halves the
  # base (3.7 -> 1.8 GB) but changes its fingerprint: hypernetworks and pre-optimized
  # weights are tied to the base as stored.
  model.compute_dtype = "float32"
  model.param_dtype = "float32"
  model.attention = "auto"
  model.remat = "blocks"
  model.init_seed = 0
  # PyTorch .bin weights are pickles, which can run code when read: off unless you trust them
  model.allow_pickle = False
  model.tokenizer_path = ""
  model.unet = dict(
      sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
      block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
      cross_attention_dim=768,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
  model.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
      block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
      scaling_factor=0.18215)
  model.text_encoder = dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
      projection_dim=768)
  model.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon")
  return model


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = sd15_model()
  config.lidb = dict(seed=0, a=100, b=50, rank=1,
                     targets=dict(unet=r"/attn[12]/(to_q|to_k|to_v|to_out_0)$",
                                  text_encoder=r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$"))
  config.images = ""  # required: --config.images=/path/to/photos
  config.token = "sks"
  config.class_name = "person"
  config.instance_prompt = "a {token} {class_name}"
  # LiDB DreamBooth (paper): a few hundred steps, batch 1, Adam.
  config.train = dict(steps=400, batch_size=1, learning_rate=5e-4, seed=0, hflip=True,
                      checkpoint_every=100, log_every=10)
  config.prior = dict(num_images=0, weight=1.0, prompt="a {class_name}", num_steps=50)
  config.sample = dict(
      prompts=("a photo of {token} {class_name}", "a watercolor painting of {token} {class_name}",
               "a pencil sketch of {token} {class_name}"),
      per_prompt=2, num_steps=50, guidance_scale=7.5, seed=0, upscale=1)
  # `hdb personalize` (configs/mini.py documents each key): the paper's 40 steps of the
  # rank-relaxed LoRA (r' = 4, the ports' setting), text encoder included.
  config.personalize = dict(
      hypernet="",  # required: a folder written by train.train_hypernet for this base
      iterations=0, prediction_scale=1.0, rank=4, steps=40, learning_rate=1e-4, batch_size=1,
      # The finetuning recipe's other settings (hdb_jax/finetune.py; docs/results.md's
      # levers measured them): warmup steps and schedule ("constant" | "cosine") of the
      # rate, the text encoder's rate and each layer's second factor's ("up", LoRA+'s
      # ratio) as multiples of the rate, extra random crops of
      # the photo and its mirror (shifts and zooms to `augment_min_crop` of the side), and
      # where the relaxation lives ("lora": a rank-`rank` LoRA; "lidb": inside the LiDB
      # subspace, D_train [a, rank] and U_train [rank, b] with the aux matrices frozen).
      warmup_steps=0, schedule="constant", text_encoder_lr_scale=1.0, up_lr_scale=1.0,
      # The loss weight outside the face of the aligned crop (1: the plain loss), the face
      # an ellipse (cx, cy, rx, ry; units of the side, y down): here the face box of a
      # dlib crop at margin 0.6, ~0.45 of the side (not measured on SD1.5).
      background_weight=1.0, face_ellipse=(0.5, 0.5, 0.27, 0.33),
      augment_crops=0, augment_min_crop=0.85, relax="lora",
      # A prior term against the class prompt's drift (hdb_jax/prior.py): each step also
      # draws `batch_size` of `prior_images` images the base made of `prior_prompt`, at loss
      # weight `prior_weight`; made once per base and cached. 0 images: off.
      prior_images=0, prior_weight=1.0, prior_prompt="a photo of a {class_name}",
      train_text_encoder=True, hflip=True, seed=0,
      face_check="dlib", crop_margin=0.6, min_side=256,
      prompts=("a photo of {token} {class_name}",
               "a photo of {token} {class_name} on a beach",
               "a photo of {token} {class_name} in a forest",
               "a pencil sketch of {token} {class_name}",
               "a watercolor painting of {token} {class_name}",
               "a pop art portrait of {token} {class_name}"),
      per_prompt=2, sample_steps=50, guidance_scale=7.5, upscale=1)
  return config
