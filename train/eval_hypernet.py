r"""How well does a trained hypernetwork personalize from one photo? Scored by the recognizer.

    python -m train.eval_hypernet --config configs/hypernet_mini.py \
        --hypernet assets/mini_hypernet --out docs/mini_hypernet_eval.json

For `--identities` identities of `--split` (held-out by default: never seen by pretraining,
pre-optimization or the hypernetwork), the hypernetwork reads each reference photo and
predicts LiDB weights with s = each of `--iterations`; every model then samples the same
prompts with the same noise: "a sks face", the identifier on every background, in every
style, and two style + background pairs. Rows: the base model alone (the floor), the
hypernetwork at each s, and on `--split train` the pre-optimized weights the hypernetwork
was trained towards. Scores per row: identity accuracy (plain prompt, and all prompts),
background and style accuracy on the prompts that name them, their drop from the base
(context kept?), and face validity. Writes the JSON and a PNG beside it (a row per
identity: its photo, then the base and each model on the plain prompt and two contexts).
Identities are sampled together: one batch per chunk, each identity's weights applied to
its rows through the low-rank side path.
"""

import json
import os
import sys

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import dreambooth, files, hypernet, lidb, logs, models, weights_dataset
from hdb_jax import params as params_lib
from hdb_jax.mini import render
from hdb_jax.mini import recognizer as recognizer_lib
from train import train_hypernet

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWN_IDENTITIES, SHOWN_PROMPTS = 8, (0, 1, 7)  # PNG: plain, blue background, sketch


def define_flags():
  """Command-line flags, defined only when run as a program (tests import run())."""
  config_flags.DEFINE_config_file("config", None, "Hypernetwork training config (its model, "
                                  "data and prompt).")
  flags.DEFINE_string("hypernet", None, "Trained hypernetwork folder (<workdir>/hypernet).")
  flags.DEFINE_string("out", None, "Metrics JSON to write (a PNG grid goes beside it).")
  flags.DEFINE_enum("split", "holdout", ["holdout", "train"], "Whose photos: held-out "
                    "identities, or the training identities (adds the pre-optimized row).")
  flags.DEFINE_integer("identities", 100, "Identities, spread evenly over the split.")
  flags.DEFINE_list("iterations", ["1", "2", "4", "8"], "Refinement steps s to compare.")
  flags.DEFINE_integer("per_prompt", 1, "Samples per identity and prompt.")
  flags.DEFINE_integer("chunk", 16, "Identities sampled in one batch.")
  flags.DEFINE_integer("num_steps", 25, "DDIM steps.")
  flags.DEFINE_float("guidance_scale", 4.0, "Classifier-free guidance scale.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (chunk c uses fold_in(seed, c)).")
  flags.mark_flags_as_required(["config", "hypernet", "out"])


def prompts(token: str, class_name: str) -> list[str]:
  """The identifier prompts: plain, every background, every style, two pairs (12)."""
  return render.identifier_prompts(token, class_name)


def scores(rec, images, prompt_list, identities, per_prompt: int) -> dict:
  """Per-sample recognizer scores of images [G * P * n] (identity-major, then prompt)."""
  predictions = rec(images)
  chosen = [p for _ in identities for p in prompt_list for _ in range(per_prompt)]
  truth = np.repeat(render.identity_attributes(np.asarray(identities)),
                    len(prompt_list) * per_prompt, axis=0)
  context = recognizer_lib.context_accuracy(predictions,
                                            **recognizer_lib.context_targets(chosen))
  return {"identity": recognizer_lib.identity_accuracy(predictions, truth),
          "valid": recognizer_lib.face_validity(predictions).astype(np.float32),
          "background": context["background"], "style": context["style"],
          "plain": np.array([p == prompt_list[0] for p in chosen])}


def summarize(per_sample: dict, base: dict | None) -> dict:
  nanmean = lambda x: float(np.nanmean(x)) if np.any(~np.isnan(x)) else None
  out = {"identity_accuracy_plain": float(per_sample["identity"][per_sample["plain"]].mean()),
         "identity_accuracy_all_prompts": float(per_sample["identity"].mean()),
         "background_accuracy": nanmean(per_sample["background"]),
         "style_accuracy": nanmean(per_sample["style"]),
         "face_validity": float(per_sample["valid"].mean())}
  if base is not None:
    for name in ("background_accuracy", "style_accuracy"):
      out[name + "_drop"] = base[name] - out[name]
    out["identity_gain_plain"] = (out["identity_accuracy_plain"]
                                  - base["identity_accuracy_plain"])
  return out


def run(config, hypernet_dir: str, split: str, num_identities: int, iterations: list[int],
        per_prompt: int, chunk: int, num_steps: int, guidance_scale: float,
        seed: int) -> tuple[dict, np.ndarray]:
  """-> (metrics, grid images [shown * (1 + rows * 3), H, W, 3] in [-1, 1])."""
  net, params, info = hypernet.load(hypernet_dir)
  net_params, learned_aux = hypernet.split_aux(params, net.layout)
  spec = info["lidb_spec"]
  sd, frozen = models.load_or_build(config.model)
  fingerprint = params_lib.fingerprint(frozen, spec.layers)
  if info["base_fingerprint"] != fingerprint:
    raise ValueError(f"{hypernet_dir}: trained on base {info['base_fingerprint']}, "
                     f"config.model is {fingerprint}")
  aux = learned_aux if learned_aux is not None else lidb.make_aux(spec)
  photos, holdout_ids, _ = train_hypernet.data_parts(config.data, sd.image_size)
  targets = None
  if split == "train":
    targets = weights_dataset.open_dataset(config.data.weights)
    pool = targets.identities
  else:
    pool = holdout_ids
  picks = np.linspace(0, len(pool) - 1, min(num_identities, len(pool))).round().astype(int)
  identities = np.asarray(pool)[picks]
  rec = recognizer_lib.load()
  prompt_list = prompts(config.token, config.class_name)
  rows_per_identity = len(prompt_list) * per_prompt
  predict = {s: jax.jit(lambda p, x, s=s: net.apply({"params": p}, x, iterations=s))
             for s in iterations}
  generate_base = dreambooth.make_generate(sd, num_steps)
  generate = dreambooth.make_generate_per_identity(sd, num_steps)
  names = ["base"] + [f"hypernet_s{s}" for s in iterations] + (
      ["preoptimized"] if targets is not None else [])
  per_sample = {name: [] for name in names}
  shown = {name: [] for name in names}
  images_shown = []
  for c, start in enumerate(tqdm(range(0, len(identities), chunk), desc="identities",
                                 unit="chunk")):
    ids = identities[start:start + chunk]
    pad = chunk - len(ids)  # one compiled shape for every chunk
    padded = np.concatenate([ids, np.repeat(ids[:1], pad)])
    photo = photos(split, padded)["images"]
    encoder_input = photo.astype(np.float32) / 127.5 - 1.0
    cond = np.tile(np.repeat(sd.tokenize(prompt_list), per_prompt, 0), (chunk, 1))
    uncond = np.repeat(sd.tokenize([""]), len(cond), 0)
    key = jax.random.fold_in(jax.random.key(seed), c)
    weights = {f"hypernet_s{s}": predict[s](net_params, encoder_input) for s in iterations}
    if targets is not None:
      weights["preoptimized"] = jax.tree_util.tree_map(
          lambda *rows: np.stack(rows), *[targets.get(int(i)) for i in padded])
    for name in names:
      if name == "base":
        out = generate_base(frozen, None, None, cond, uncond, key, guidance_scale)
      else:
        out = generate(frozen, weights[name], aux, cond, uncond, key, guidance_scale)
      out = np.asarray(out)[:len(ids) * rows_per_identity]
      per_sample[name].append(scores(rec, out, prompt_list, ids, per_prompt))
      if start < SHOWN_IDENTITIES:
        shown[name].append(out.reshape((len(ids), rows_per_identity) + out.shape[1:]))
    if start < SHOWN_IDENTITIES:
      images_shown.append(encoder_input[:len(ids)])

  per_sample = {name: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                for name, parts in per_sample.items()}
  summary = {"base": summarize(per_sample["base"], None)}
  for name in names[1:]:
    summary[name] = summarize(per_sample[name], summary["base"])
  plain = {name: per_sample[name]["identity"][per_sample[name]["plain"]].reshape(
      len(identities), per_prompt).mean(1) for name in names}
  metrics = {
      "split": split, "num_identities": len(identities), "prompts": prompt_list,
      "samples_per_prompt": per_prompt, "num_steps": num_steps,
      "guidance_scale": guidance_scale, "seed": seed, "base_fingerprint": fingerprint,
      "hypernet_fingerprint": info["fingerprint"], "learned_aux": learned_aux is not None,
      "rows": summary,
      "per_identity_plain": [dict({"identity": int(i)}, **{n: float(plain[n][k])
                                                          for n in names})
                             for k, i in enumerate(identities)],
  }
  photos_shown = np.concatenate(images_shown)[:SHOWN_IDENTITIES]
  samples = {n: np.concatenate(shown[n])[:SHOWN_IDENTITIES] for n in names}
  grid = []
  for k in range(len(photos_shown)):
    grid.append(photos_shown[k:k + 1])
    for n in names:
      grid.append(samples[n][k, [p * per_prompt for p in SHOWN_PROMPTS]])
  return metrics, np.concatenate(grid)


def main(argv):
  del argv
  logs.quiet_libraries()
  iterations = [int(s) for s in FLAGS.iterations]
  metrics, grid = run(FLAGS.config, FLAGS.hypernet, FLAGS.split, FLAGS.identities,
                      iterations, FLAGS.per_prompt, FLAGS.chunk, FLAGS.num_steps,
                      FLAGS.guidance_scale, FLAGS.seed)
  metrics["command"] = "python -m train.eval_hypernet " + files.portable_command(
      sys.argv[1:], REPO)
  files.write_json(FLAGS.out, metrics)
  png = os.path.splitext(FLAGS.out)[0] + ".png"
  rows = min(SHOWN_IDENTITIES, metrics["num_identities"])
  files.save_grid(grid, png, rows=rows, upscale=2)
  logging.info("wrote %s and %s", FLAGS.out, png)
  print(json.dumps(metrics["rows"], indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
