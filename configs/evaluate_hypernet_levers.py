"""Levers of the hypernetwork in the mini world: networks trained another way, each scored
as hypernetwork only (no finetuning) at the iterations it was trained with, on the
comparison table's held-out identities, prompts and noise.

    python -m train.evaluate --config configs/evaluate_hypernet_levers.py \
        --workdir workdir/hypernet_levers

Everything but `methods` is configs/evaluate_mini.py's, so rows compare pairwise with the
table's (whose network, assets/mini_hypernet_5k, is `hypernet_only`); the paired
differences are against `hypernet_only_1200`, the table network's recipe (s = 4,
alpha = beta = 1, 5,000 steps) on the same 1,200 pre-optimized identities
(assets/mini_preopt) as the levers' networks. Each network's training command is in its
folder's provenance.json; docs/results.md "Levers of the hypernetwork" has the table
(raw results: docs/mini_hypernet_levers/).
"""

import os

import ml_collections

from hdb_jax import config_file


def get_config() -> ml_collections.ConfigDict:
  config = config_file.sibling(__file__, "evaluate_mini").get_config()
  assets = os.path.dirname(config.personalize.hypernet)
  network = lambda name: os.path.join(assets, name)
  config.reference_method = "hypernet_only_1200"
  # the committed network against the table's, trained on the same 2,400 identities
  config.paired_also = {"hypernet_only_steps10k_all": "hypernet_only",
                        "hypernet_only_steps10k_all_scale150": "hypernet_only_scale150",
                        "hypernet_only_steps10k_all_scale200": "hypernet_only_scale200"}
  config.methods = {
      "base": dict(kind="base"),  # the table's: the target is base + 0.15 (plain prompt)
      # the table network's recipe on the levers' 1,200 identities (the reference) and on 2,400
      # (the table's hypernet_only and hypernet_only_s6: s = 6 only at prediction)
      "hypernet_only_1200": dict(kind="personalize", steps=0,
                                 hypernet=network("mini_hypernet_1200")),
      "hypernet_only": dict(kind="personalize", steps=0),
      "hypernet_only_s6": dict(kind="personalize", steps=0, iterations=6),
      # trained with s = 6 refinement steps (config.hypernet.iterations=6), predicting with 6
      "hypernet_only_trained_s6": dict(kind="personalize", steps=0,
                                       hypernet=network("mini_hypernet_s6")),
      # the diffusion loss at 4x the weight-space loss's weight (train.alpha=4)
      "hypernet_only_alpha4": dict(kind="personalize", steps=0,
                                   hypernet=network("mini_hypernet_alpha4")),
      # the table's network's prediction at s = 4, each residual scaled (prediction_scale;
      # the name has the factor in percent)
      "hypernet_only_scale150": dict(kind="personalize", steps=0, prediction_scale=1.5),
      "hypernet_only_scale200": dict(kind="personalize", steps=0, prediction_scale=2.0),
      # trained on averaged targets: the mean of the 1,200 identities pre-optimized with two
      # seeds (configs/hypernet_mini.py:mean_targets), alone and with its prediction at 2x
      "hypernet_only_mean_targets": dict(kind="personalize", steps=0,
                                         hypernet=network("mini_hypernet_mean_targets")),
      "hypernet_only_mean_targets_scale200": dict(
          kind="personalize", steps=0, prediction_scale=2.0,
          hypernet=network("mini_hypernet_mean_targets")),
      # trained on targets pre-optimized from 4 photo views of each identity (the network
      # still reads one photo; configs/hypernet_mini.py:views4_targets), alone and at 2x
      "hypernet_only_views4_targets": dict(kind="personalize", steps=0,
                                           hypernet=network("mini_hypernet_views4_targets")),
      "hypernet_only_views4_targets_scale200": dict(
          kind="personalize", steps=0, prediction_scale=2.0,
          hypernet=network("mini_hypernet_views4_targets")),
      # the 5,000-step recipe trained twice as long (10,000 steps; :steps10k)
      "hypernet_only_steps10k": dict(kind="personalize", steps=0,
                                     hypernet=network("mini_hypernet_steps10k")),
      # and so on the table's 2,400 identities: the committed network (:steps10k_all),
      # alone, at 1.5x and at 2x
      "hypernet_only_steps10k_all": dict(kind="personalize", steps=0,
                                         hypernet=network("mini_hypernet")),
      "hypernet_only_steps10k_all_scale150": dict(kind="personalize", steps=0,
                                                  prediction_scale=1.5,
                                                  hypernet=network("mini_hypernet")),
      "hypernet_only_steps10k_all_scale200": dict(kind="personalize", steps=0,
                                                  prediction_scale=2.0,
                                                  hypernet=network("mini_hypernet")),
  }
  return config
