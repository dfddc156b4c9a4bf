"""The mini world: a tiny SD-like base pretrained here on `synthetic_faces`, committed.

Personalize the example subject with LiDB DreamBooth on the committed base
(assets/mini_base, Flax weights in the diffusers folder layout):

    python -m train.lidb_dreambooth --config configs/mini.py --workdir workdir/mini

Pretrain the base again from scratch (VAE, then UNet + text encoder; <= 90 min on a
2-core CPU; resumable; writes <workdir>/base and sample grids; see docs/mini_world.md):

    python -m train.pretrain_base --config configs/mini.py --workdir workdir/mini_base
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "assets", "mini_base")


def mini_model() -> ml_collections.ConfigDict:
  """Architecture: SD1.5's component classes at toy sizes; 32x32 images, 8x8x4 latents."""
  model = ml_collections.ConfigDict()
  model.path = BASE  # the committed pretrained base; "" builds the architecture below
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
      block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=64,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  model.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
      block_out_channels=(16, 32, 64), norm_num_groups=16, sample_size=32,
      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
      scaling_factor=1.0)  # replaced by 1/std of the latents after the VAE stage
  model.text_encoder = dict(
      vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
      projection_dim=64, bos_token_id=785, eos_token_id=786, pad_token_id=786)
  model.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon")
  return model


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = mini_model()
  config.lidb = dict(seed=0, a=100, b=50, rank=1,
                     targets=dict(unet=r"/attn[12]/(to_q|to_k|to_v|to_out_0)$",
                                  text_encoder=r"/self_attn/(q_proj|k_proj|v_proj|out_proj)$"))

  # LiDB DreamBooth of one subject (train/lidb_dreambooth.py).
  config.images = os.path.join(REPO, "assets", "mini_subject")  # a holdout identity
  config.token = "sks"
  config.class_name = "face"
  config.instance_prompt = "a {token} {class_name}"
  config.train = dict(steps=300, batch_size=4, learning_rate=5e-3, seed=0, hflip=False,
                      checkpoint_every=100, log_every=10)
  config.prior = dict(num_images=0, weight=1.0, prompt="a {class_name}", num_steps=20)
  config.sample = dict(
      prompts=("a {token} {class_name}", "a sketch of a {token} {class_name}",
               "a painting of a {token} {class_name} on a green background",
               "a cartoon of a {token} {class_name} on a pink background"),
      per_prompt=4, num_steps=25, guidance_scale=4.0, seed=0, upscale=4)

  # One photo -> a personalization (`hdb personalize`, hdb_jax/personalize.py): the
  # hypernetwork predicts LiDB weights, relaxed to rank `rank`, finetuned `steps` steps
  # (0: hypernetwork only) with Adam (no weight decay) at `learning_rate` on the photo
  # (+ mirror), `batch_size` draws a step. The recipe is the levers' best with the context
  # kept (docs/results.md "Levers": rank 16 inside the LiDB subspace, 80 steps of 8 draws
  # at 4e-3, the loss weighted to the face: identity 0.61 on all identifier prompts against
  # the paper's recipe's 0.48, background and style within 2 points of the base); the
  # paper's (rank-4 LoRA, 40 steps of 4) is configs/evaluate_mini.py's PAPER_RECIPE.
  config.personalize = dict(
      hypernet=os.path.join(REPO, "assets", "mini_hypernet"), iterations=0,  # 0: as trained
      prediction_scale=1.0,  # the predicted residual times this before finetuning
      rank=16, steps=80, learning_rate=4e-3, batch_size=8, train_text_encoder=True,
      # The finetuning recipe's other settings (hdb_jax/finetune.py; docs/results.md's
      # levers measured them): warmup steps and schedule ("constant" | "cosine") of the
      # rate, the text encoder's rate and each layer's second factor's ("up", LoRA+'s
      # ratio) as multiples of the rate, extra random crops of
      # the photo and its mirror (shifts and zooms to `augment_min_crop` of the side), and
      # where the relaxation lives ("lora": a rank-`rank` LoRA; "lidb": inside the LiDB
      # subspace, D_train [a, rank] and U_train [rank, b] with the aux matrices frozen).
      warmup_steps=0, schedule="constant", text_encoder_lr_scale=1.0, up_lr_scale=1.0,
      # The loss weight outside the face of the aligned crop (1: the plain loss), the face
      # an ellipse (cx, cy, rx, ry; units of the side, y down): here the mini world's mean
      # face mask above 0.2 (hair included) on its photos.
      background_weight=0.2, face_ellipse=(0.5, 0.48, 0.34, 0.38),
      augment_crops=0, augment_min_crop=0.85, relax="lidb",
      # A prior term against the class prompt's drift (hdb_jax/prior.py): each step also
      # draws `batch_size` of `prior_images` images the base made of `prior_prompt`, at loss
      # weight `prior_weight`; made once per base and cached. 0 images: off.
      prior_images=0, prior_weight=1.0, prior_prompt="a {class_name}",
      hflip=True, seed=0,
      face_check="mini_recognizer",  # the mini world's recognizer refuses non-faces;
                                     # "dlib" for real photos (configs/sd15.py), "none"
      crop_margin=0.6,               # "dlib" only: the aligned crop's margin (hdb_jax/faces.py)
      min_side=16,                   # smaller photos are refused
      prompts=("a {token} {class_name}",
               "a {token} {class_name} on a blue background",
               "a {token} {class_name} on a pink background",
               "a sketch of a {token} {class_name}",
               "a painting of a {token} {class_name}",
               "a cartoon of a {token} {class_name} on a green background"),
      per_prompt=4, sample_steps=25, guidance_scale=4.0, upscale=4)

  # Pretraining the base (train/pretrain_base.py) on synthetic_faces/<data.config>.
  config.data = dict(config="default", data_dir="")  # "" -> $HDB_DATA_DIR or ~/tensorflow_datasets
  config.pretrain = dict(
      seed=0,
      vae=dict(steps=2000, batch_size=32, learning_rate=2e-3, warmup=100, kl_weight=1e-4,
               checkpoint_every=500),
      # 10,000 steps (6,000 for the first base): its samples were blurry and its loss
      # still falling; the extra 30 minutes of the 90-minute budget go to the UNet.
      diffusion=dict(steps=10000, batch_size=64, learning_rate=1e-3, warmup=300,
                     weight_decay=0.0, caption_dropout=0.1, ema_decay=0.999,
                     caption_variants=8,  # per image, hdb_jax/mini/captions.py; 0: dataset's
                     checkpoint_every=500, sample_every=2500, log_every=50),
      sample_prompts=("a face", "a face on a blue background", "a sketch of a face",
                      "a painting of a face on a pink background",
                      "a cartoon of a face on a green background",
                      "a photo of a face on a gray background",
                      "a sketch of a sks face on a blue background",
                      "a painting of a sks face on a green background"),
      sample_per_prompt=8, sample_steps=25, guidance_scale=4.0)
  return config
