"""The identity-context-time frontier in the mini world: the comparison table's methods at
other step counts, on the same held-out identities, prompts and noise.

    python -m train.evaluate --config configs/evaluate_frontier.py --workdir workdir/frontier \
        --methods full_10,full_20,full_80,full_160,lidb_dreambooth_100,lidb_dreambooth_1000,dreambooth_1200
    python -m train.evaluate --config configs/evaluate_frontier.py --workdir workdir/frontier \
        --methods lora_dreambooth_40,lora_dreambooth_100,lora_dreambooth_200,lora_dreambooth_800

Everything but `methods` is configs/evaluate_mini.py's (identities, prompts, seeds, noise,
sampler), so rows here and in the table compare pairwise. The raw results of the rows
measured so far are in docs/mini_frontier/ (their seconds were measured on a loaded CPU:
the frontier's time axis uses each method's step time from one benchmark run instead).
"""

import ml_collections

from hdb_jax import config_file


def get_config() -> ml_collections.ConfigDict:
  config = config_file.sibling(__file__, "evaluate_mini").get_config()
  table = config.methods
  config.methods = {
      # the full method (hypernetwork s = 4, rank-4 relaxation) at other finetuning steps
      **{f"full_{steps}": dict(kind="personalize", steps=steps) for steps in (10, 20, 80, 160)},
      # LiDB DreamBooth (rank 1) at other steps
      **{f"lidb_dreambooth_{steps}": dict(table["lidb_dreambooth_400"].to_dict(), steps=steps)
         for steps in (100, 1000)},
      # LoRA DreamBooth (rank 4, peft's init) at other steps; 400 is the table's row
      **{f"lora_dreambooth_{steps}": dict(table["lora_dreambooth_400"].to_dict(), steps=steps)
         for steps in (40, 100, 200, 800)},
      # DreamBooth proper at the paper's 1,200 steps
      "dreambooth_1200": dict(table["dreambooth_400"].to_dict(), steps=1200),
  }
  return config
