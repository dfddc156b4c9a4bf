"""Levers of the full method in the mini world: the fast finetuning recipe changed one
setting at a time, on the comparison table's held-out identities, prompts and noise.

    python -m train.evaluate --config configs/evaluate_levers.py --workdir workdir/levers

Everything but `methods` is configs/evaluate_mini.py's, so each row compares pairwise with
the table's `full` (hypernetwork s = 4, rank-4 relaxation, 40 Adam steps at 5e-3, batch 4,
text encoder trained; its results are the table's, copied). The raw results and the
table of the rows measured so far are in docs/mini_levers/.
"""

import ml_collections

from hdb_jax import config_file


def get_config() -> ml_collections.ConfigDict:
  config = config_file.sibling(__file__, "evaluate_mini").get_config()
  config.methods = {
      # the reference: the table's full method (the same results; paired differences)
      "full": dict(kind="personalize"),
      # learning rate (the table's full: 5e-3)
      "full_lr1e-2": dict(kind="personalize", learning_rate=1e-2),
      "full_lr2e-2": dict(kind="personalize", learning_rate=2e-2),
      "full_80_lr1e-2": dict(kind="personalize", steps=80, learning_rate=1e-2),
      # relaxed rank r' (the table's full: 4)
      "full_rank8": dict(kind="personalize", rank=8),
      "full_rank16": dict(kind="personalize", rank=16),
      # draws per step (the table's full: 4 = photo and mirror, twice)
      "full_batch8": dict(kind="personalize", batch_size=8),
      # the UNet only (the table's full also trains the text encoder's LoRA)
      "full_unet_only": dict(kind="personalize", train_text_encoder=False),
      # the best levers together: 1e-2, rank 16, and more steps
      "full_80_lr1e-2_rank16": dict(kind="personalize", steps=80, learning_rate=1e-2,
                                    rank=16),
      "full_160_lr1e-2": dict(kind="personalize", steps=160, learning_rate=1e-2),
      "full_lr1e-2_rank16": dict(kind="personalize", learning_rate=1e-2, rank=16),
      "full_80_rank16": dict(kind="personalize", steps=80, rank=16),
      # the rate's warmup and schedule (the table's full: constant, no warmup)
      "full_warmup10": dict(kind="personalize", warmup_steps=10),
      "full_cosine_lr1e-2": dict(kind="personalize", schedule="cosine", learning_rate=1e-2),
      # the text encoder's rate (the table's full: the UNet's)
      "full_lr1e-2_te_quarter": dict(kind="personalize", learning_rate=1e-2,
                                 text_encoder_lr_scale=0.25),
      # augmented views: 3 random crops (shifts and zooms to 0.85 of the side) of the
      # photo and of its mirror, 8 views (the table's full: the photo and its mirror)
      "full_crops3": dict(kind="personalize", augment_crops=3),
      # the relaxation inside the LiDB subspace (D_train [a, r'], U_train [r', b])
      "full_lidb": dict(kind="personalize", relax="lidb"),
      "full_lidb_rank16": dict(kind="personalize", relax="lidb", rank=16),
      # the best recipe with the context kept, with augmented views
      "full_80_rank16_crops3": dict(kind="personalize", steps=80, rank=16, augment_crops=3),
      # the prior term (hdb_jax/prior.py): 16 class images the base made, per step as many
      # draws of them as of the photo, at loss weight 1 or 0.3
      "full_prior16": dict(kind="personalize", prior_images=16, prior_weight=1.0),
      "full_prior16_w03": dict(kind="personalize", prior_images=16, prior_weight=0.3),
      "full_80_rank16_prior16": dict(kind="personalize", steps=80, rank=16, prior_images=16,
                                     prior_weight=1.0),
      # the LiDB-subspace relaxation pushed further (it keeps the context at rank 16)
      "full_lidb_rank16_lr1e-2": dict(kind="personalize", relax="lidb", rank=16,
                                      learning_rate=1e-2),
      "full_lidb_80_rank16": dict(kind="personalize", relax="lidb", rank=16, steps=80),
      "full_lidb_80_rank16_lr1e-2": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                         learning_rate=1e-2),
      "full_lidb_160_rank16_lr1e-2": dict(kind="personalize", relax="lidb", rank=16,
                                          steps=160, learning_rate=1e-2),
      "full_lidb_120_rank16": dict(kind="personalize", relax="lidb", rank=16, steps=120),
      "full_lidb_160_rank16": dict(kind="personalize", relax="lidb", rank=16, steps=160),
      "full_lidb_80_rank16_lr7e-3": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                         learning_rate=7e-3),
      # the prior term at a small weight on the best recipe with the context kept
      "full_lidb_80_rank16_prior16_w01": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, prior_images=16, prior_weight=0.1),
      # LoRA+'s ratio (Hayou et al. 2024): the second factor (U_train) at a multiple of
      # the rate, on the 80-step LiDB-subspace recipe; and 8 draws a step there
      "full_lidb_80_rank16_up4": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                      up_lr_scale=4.0),
      "full_lidb_80_rank16_up16_lr2e-3": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, up_lr_scale=16.0, learning_rate=2e-3),
      "full_lidb_80_rank16_batch8": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                         batch_size=8),
      # the loss on the face of the aligned crop (background_weight outside its ellipse,
      # face_ellipse: the mini world's mean face mask), on the 80-step LiDB-subspace recipe
      "full_lidb_80_rank16_bg01": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                       background_weight=0.1),
      "full_lidb_80_rank16_lr1e-2_bg01": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, learning_rate=1e-2,
                                              background_weight=0.1),
      # the face-weighted loss at background weight 0.3, and with 8 draws a step
      "full_lidb_80_rank16_bg03": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                       background_weight=0.3),
      "full_lidb_80_rank16_batch8_bg01": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, batch_size=8, background_weight=0.1),
      # the photo's prompt names its style ("a photo of a sks face", a caption the base
      # was trained with), so that the identifier need not carry it
      "full_lidb_80_rank16_photo": dict(kind="personalize", relax="lidb", rank=16, steps=80,
                                        instance_prompt="a photo of a {token} {class_name}"),
      "full_lidb_80_rank16_bg01_photo": dict(kind="personalize", relax="lidb", rank=16,
                                             steps=80, background_weight=0.1,
                                             instance_prompt="a photo of a {token} {class_name}"),
      "full_lidb_80_rank16_batch8_bg03": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, batch_size=8, background_weight=0.3),
      # ... with the text encoder at a quarter of the rate, at background weight 0.2, and
      # from the prediction scaled 2x
      "full_lidb_80_rank16_batch8_bg01_te_quarter": dict(
          kind="personalize", relax="lidb", rank=16, steps=80, batch_size=8,
          background_weight=0.1, text_encoder_lr_scale=0.25),
      "full_lidb_80_rank16_batch8_bg02": dict(kind="personalize", relax="lidb", rank=16,
                                              steps=80, batch_size=8, background_weight=0.2),
      "full_lidb_80_rank16_batch8_bg01_scale200": dict(
          kind="personalize", relax="lidb", rank=16, steps=80, batch_size=8,
          background_weight=0.1, prediction_scale=2.0),
      "full_lidb_80_rank16_batch8_bg02_lr4e-3": dict(
          kind="personalize", relax="lidb", rank=16, steps=80, batch_size=8,
          background_weight=0.2, learning_rate=4e-3),
  }
  return config
