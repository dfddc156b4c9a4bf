"""Quality of a mini-world base model, measured with the recognizer.

Three prompt groups, each sampled with fixed seeds:
  "a face"                               face validity and diversity (distinct predicted
                                         identity-attribute tuples among valid samples)
  "a face on a <colour> background"      background accuracy, every colour in turn
  "a <style> of a face" / "a face"       style accuracy, every style in turn (a prompt
                                         without a style word asks for a photo)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import dreambooth, recognizer as recognizer_lib
from hdb_jax.data import render

# Targets of issue "Mini world" item 6, for 256 samples per group.
TARGETS = {"face_validity": 0.90, "background_accuracy": 0.90, "style_accuracy": 0.90,
           "diversity_per_256": 50}


def prompt_groups() -> dict[str, list[str]]:
  return {
      "face": ["a face"],
      "background": [f"a face on a {colour} background" for colour in render.BACKGROUNDS],
      "style": [f"a {style} of a face" for style in render.STYLES],
  }


def sample_prompts(sd, params, prompts, count: int, seed: int, num_steps: int,
                   guidance_scale: float, batch_size: int = 64):
  """`count` images cycling over `prompts` -> (images [count, H, W, 3] in [-1, 1], prompts)."""
  generate = dreambooth.make_generate(sd, num_steps)
  chosen = [prompts[i % len(prompts)] for i in range(count)]
  images = []
  for start in range(0, count, batch_size):
    batch = chosen[start:start + batch_size]
    pad = batch_size - len(batch)  # one compiled shape for every batch
    cond = sd.tokenize(batch + batch[:1] * pad)
    uncond = np.repeat(sd.tokenize([""]), batch_size, 0)
    out = generate(params, None, None, cond, uncond,
                   jax.random.fold_in(jax.random.key(seed), start), guidance_scale)
    images.append(np.asarray(out[:len(batch)]))
  return np.concatenate(images), chosen


def evaluate(sd, params, recognizer=None, per_group: int = 256, seed: int = 0,
             num_steps: int = 25, guidance_scale: float = 4.0) -> tuple[dict, dict]:
  """Metrics of the base model and the sampled images of each group."""
  recognizer = recognizer or recognizer_lib.load()
  metrics, samples = {}, {}
  for group, prompts in prompt_groups().items():
    images, chosen = sample_prompts(sd, params, prompts, per_group, seed, num_steps,
                                    guidance_scale)
    samples[group] = images
    result = recognizer_lib.evaluate(recognizer, images, prompts=chosen)
    metrics[group] = result
  summary = {
      "samples_per_group": per_group,
      "face_validity": float(np.mean([metrics[g]["face_validity"] for g in metrics])),
      "face_validity_a_face": metrics["face"]["face_validity"],
      "diversity": metrics["face"]["diversity"],
      "background_accuracy": metrics["background"]["background_accuracy"],
      "style_accuracy": metrics["style"]["style_accuracy"],
  }
  summary["passes"] = bool(
      summary["face_validity"] >= TARGETS["face_validity"]
      and summary["background_accuracy"] >= TARGETS["background_accuracy"]
      and summary["style_accuracy"] >= TARGETS["style_accuracy"]
      and summary["diversity"] >= TARGETS["diversity_per_256"] * per_group / 256)
  return {"summary": summary, "groups": metrics}, samples
